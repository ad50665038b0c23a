"""Email texts from message catalogues: one TOML file per language, each kind a subject, a
text and an HTML body of ``$placeholder`` templates, checked whole when a file is loaded.

The API (``engine/api/emails``) and billing (``engine/billing/messages``) each keep their own
files and kinds; this is the one place that reads, checks and fills them.
"""

from __future__ import annotations

import html
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from string import Template

import msgspec

from engine.core.errors import TradecopyError

KEYS = ("subject", "text", "html")
#: ``en``, ``pt``, ``pt-BR``: a language names its file, so nothing else may pass.
LANGUAGE = re.compile(r"^[a-z]{2}(-[A-Z]{2})?\Z")

Templates = dict[str, dict[str, Template]]


class CatalogueError(TradecopyError):
    """A language file is missing, or misses a kind, a key or a placeholder."""


class RenderedEmail(msgspec.Struct, frozen=True, kw_only=True):
    """One email, written: what an outbox seals and its sender hands to SMTP."""

    to: str
    subject: str
    text: str
    html: str


def catalogue_path(directory: Path, language: str, what: str) -> Path:
    """The file of ``language`` in ``directory``; a name that is not a language, or a
    language without a file, is a ``CatalogueError`` that lists the languages there are."""
    if not LANGUAGE.match(language):
        raise CatalogueError(f"language {language!r}: two letters, like 'en' or 'pt-BR'")
    path = directory / f"{language}.toml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in directory.glob("*.toml")))
        raise CatalogueError(f"no {what} catalogue for {language!r} (have: {have})")
    return path


def load_catalogue(
    path: Path,
    placeholders: Mapping[str, frozenset[str]],
    text_must_use: Mapping[str, frozenset[str]],
) -> Templates:
    """Every kind of ``placeholders`` from ``path``, checked whole, so a missing kind or key,
    an unknown placeholder, or a text that leaves out what its kind's ``text_must_use`` names
    fails at start, not when the first such email is due."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"{path.name}: {exc}") from None
    found: Templates = {}
    for kind, allowed in placeholders.items():
        entry = raw.get(kind)
        if not isinstance(entry, dict):
            raise CatalogueError(f"{path.name}: kind [{kind}] is missing")
        templates = {}
        for key in KEYS:
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise CatalogueError(f"{path.name}: [{kind}] has no {key}")
            template = Template(value.strip() + ("\n" if key != "subject" else ""))
            unknown = set(template.get_identifiers()) - allowed
            if unknown or not template.is_valid():
                raise CatalogueError(
                    f"{path.name}: [{kind}].{key} uses unknown placeholders {sorted(unknown)}"
                )
            templates[key] = template
        missing = text_must_use.get(kind, frozenset()) - set(templates["text"].get_identifiers())
        if missing:
            raise CatalogueError(f"{path.name}: [{kind}].text leaves out {sorted(missing)}")
        found[kind] = templates
    return found


def render_email(
    templates: Mapping[str, Template],
    needs: frozenset[str],
    kind: str,
    *,
    to: str,
    values: Mapping[str, str | int],
) -> RenderedEmail:
    """One kind's templates filled for ``to``; values are escaped in the HTML body."""
    missing = needs - values.keys()
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
