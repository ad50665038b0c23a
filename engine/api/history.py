"""The ledger's read models for the caller's accounts: positions, history, decisions, statistics."""

from __future__ import annotations

from engine.api.handling import Route

ROUTES: list[Route] = []
