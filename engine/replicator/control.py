"""Operator controls over the replicator's own state: resuming a link a protection paused."""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from engine.replicator.state import link_state_decoder, link_state_encoder


async def resume_link(kv: KeyValue, link_id: str) -> bool:
    """Lift a protection's pause on ``link_id`` (``tc_link_state`` bucket); False if not paused.

    The equity peak is reset too: the drawdown is measured from the equity at resumption, or
    the same drawdown would pause the link again at once. Compare-and-set: a replicator that
    changes the state meanwhile makes this fail rather than be overwritten.
    """
    try:
        entry = await kv.get(link_id)
    except nats.js.errors.KeyNotFoundError:
        return False
    state = link_state_decoder.decode(entry.value or b"")
    if not state.paused:
        return False
    resumed = msgspec.structs.replace(
        state, paused=False, paused_rule="", paused_day="", close_all_pending=False,
        peak_equity=None,
    )  # fmt: skip
    await kv.update(link_id, link_state_encoder.encode(resumed), last=entry.revision)
    return True
