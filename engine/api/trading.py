"""Trading from the web: manual orders on the caller's own accounts, order and risk templates."""

from __future__ import annotations

from engine.api.handling import Route

ROUTES: list[Route] = []
