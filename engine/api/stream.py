"""Live updates: the caller's decisions, reports, positions and account states over SSE."""

from __future__ import annotations

from engine.api.handling import Route

ROUTES: list[Route] = []
