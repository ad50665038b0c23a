"""The API's email texts: a catalogue per language (``emails/<language>.toml``), each kind with
a subject, a text and an HTML body, filled from ``$placeholder`` templates."""

from __future__ import annotations

import functools
import html
import re
import tomllib
from pathlib import Path
from string import Template

import msgspec

from engine.core.errors import TradecopyError

CATALOGUE_DIR = Path(__file__).parent / "emails"
KINDS = ("invite", "password_reset", "verify_email")
KEYS = ("subject", "text", "html")
#: The placeholders each kind's templates may use (and the caller must give).
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "invite": frozenset({"link", "tenant", "role", "days"}),
    "password_reset": frozenset({"link", "minutes"}),
    "verify_email": frozenset({"link", "hours"}),
}
_LANGUAGE = re.compile(r"^[a-z]{2}(-[A-Z]{2})?\Z")


class CatalogueError(TradecopyError):
    """A language file is missing, or misses a kind, a key or a placeholder."""


class RenderedEmail(msgspec.Struct, frozen=True, kw_only=True):
    """One email, written: what the outbox seals and the sender hands to SMTP."""

    to: str
    subject: str
    text: str
    html: str


def languages() -> list[str]:
    return sorted(p.stem for p in CATALOGUE_DIR.glob("*.toml"))


@functools.cache
def catalogue(language: str) -> dict[str, dict[str, Template]]:
    """Every kind of ``language``, checked whole: a missing kind, key or an unknown
    placeholder fails here, at start, not when the first such email is due."""
    if not _LANGUAGE.match(language):
        raise CatalogueError(f"language {language!r}: two letters, like 'en' or 'pt-BR'")
    path = CATALOGUE_DIR / f"{language}.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError(
            f"no email catalogue for {language!r} (have: {', '.join(languages())})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"{path.name}: {exc}") from None
    found: dict[str, dict[str, Template]] = {}
    for kind in KINDS:
        entry = raw.get(kind)
        if not isinstance(entry, dict):
            raise CatalogueError(f"{path.name}: kind [{kind}] is missing")
        templates = {}
        for key in KEYS:
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise CatalogueError(f"{path.name}: [{kind}] has no {key}")
            template = Template(value.strip() + ("\n" if key != "subject" else ""))
            used = set(template.get_identifiers())
            unknown = used - PLACEHOLDERS[kind]
            if unknown or not template.is_valid():
                raise CatalogueError(
                    f"{path.name}: [{kind}].{key} uses unknown placeholders {sorted(unknown)}"
                )
            templates[key] = template
        if "link" not in templates["text"].get_identifiers():
            raise CatalogueError(f"{path.name}: [{kind}].text must show $link")
        found[kind] = templates
    return found


def render(language: str, kind: str, *, to: str, **values: str | int) -> RenderedEmail:
    """The email of ``kind`` for ``to``; values are escaped in the HTML body."""
    templates = catalogue(language)[kind]
    missing = PLACEHOLDERS[kind] - values.keys()
    if missing:
        raise CatalogueError(f"email {kind!r} needs {sorted(missing)}")
    plain = {k: str(v) for k, v in values.items()}
    escaped = {k: html.escape(v, quote=True) for k, v in plain.items()}
    subject = templates["subject"].substitute(plain)
    return RenderedEmail(
        to=to,
        subject=" ".join(subject.split()),  # a header is one line
        text=templates["text"].substitute(plain),
        html=templates["html"].substitute(escaped),
    )
