"""Invites, password reset, email verification and the TOTP second factor."""

from __future__ import annotations

from engine.api.handling import Route

ROUTES: list[Route] = []
