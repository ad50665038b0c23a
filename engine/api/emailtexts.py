"""The API's email texts: a catalogue per language (``emails/<language>.toml``), each kind with
a subject, a text and an HTML body, filled from ``$placeholder`` templates."""

from __future__ import annotations

import functools
from pathlib import Path
from string import Template

from engine.runtime.catalogue import (
    KEYS,
    CatalogueError,
    RenderedEmail,
    catalogue_path,
    load_catalogue,
    render_email,
)

__all__ = ["KEYS", "KINDS", "CatalogueError", "RenderedEmail", "catalogue", "languages", "render"]

CATALOGUE_DIR = Path(__file__).parent / "emails"
KINDS = ("invite", "password_reset", "verify_email")
#: The placeholders each kind's templates may use (and the caller must give).
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "invite": frozenset({"link", "tenant", "role", "days"}),
    "password_reset": frozenset({"link", "minutes"}),
    "verify_email": frozenset({"link", "hours"}),
}
#: Every email of the API carries its link: a text without it is useless.
_TEXT_MUST_USE = {kind: frozenset({"link"}) for kind in PLACEHOLDERS}


def languages() -> list[str]:
    return sorted(p.stem for p in CATALOGUE_DIR.glob("*.toml"))


@functools.cache
def catalogue(language: str) -> dict[str, dict[str, Template]]:
    """Every kind of ``language``, checked whole (``engine.runtime.catalogue``): every text
    shows its ``$link``."""
    path = catalogue_path(CATALOGUE_DIR, language, "email")
    return load_catalogue(path, PLACEHOLDERS, _TEXT_MUST_USE)


def render(language: str, kind: str, *, to: str, **values: str | int) -> RenderedEmail:
    """The email of ``kind`` for ``to``; values are escaped in the HTML body."""
    return render_email(catalogue(language)[kind], PLACEHOLDERS[kind], kind, to=to, values=values)
