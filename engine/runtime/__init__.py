"""Process runtime: embedded servers, logging, metrics endpoint."""

from __future__ import annotations
