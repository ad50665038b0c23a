"""Operator controls over the replicator's own state: resuming a link a protection paused.

``resume_link`` lives in ``engine.runtime.links`` so the API and the CLI lift a pause the same
way; it is imported here for the replicator's own users."""

from __future__ import annotations

from engine.runtime.links import resume_link

__all__ = ["resume_link"]
