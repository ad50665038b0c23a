"""Process runtime: embedded servers, NATS users and connections, logging, metrics endpoint."""

from __future__ import annotations
