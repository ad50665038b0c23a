"""Per-link replicator state kept in the ``tc_link_state`` KV bucket (not in any process)."""

from __future__ import annotations

import msgspec


class LinkState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the copy rules must remember about a link between events.

    Every update is a compare-and-set on the KV entry, and every field is written so that
    applying the same event twice changes nothing (crash-only replicators redo work).
    """

    day: str = ""
    """Europe/Berlin date the daily fields below belong to."""
    opened: list[str] = []
    """Master position / pending order ids copied today: the daily trade count, idempotent."""
    day_start_equity: float | None = None
    peak_equity: float | None = None
    paused: bool = False
    paused_rule: str = ""
    paused_ns: int = 0
    paused_day: str = ""
    """Set for a daily-loss pause: it lifts by itself when the day changes."""
    close_all_pending: bool = False
    """A close-all must still be published for the pause at ``paused_ns``."""

    def is_paused(self, today: str) -> bool:
        if not self.paused:
            return False
        return not (self.paused_day and self.paused_day != today)

    def opened_today(self, today: str) -> list[str]:
        return self.opened if self.day == today else []


link_state_encoder = msgspec.msgpack.Encoder()
link_state_decoder = msgspec.msgpack.Decoder(LinkState)
