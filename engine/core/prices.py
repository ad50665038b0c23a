"""Price rules shared by the replicator and the connectors: deviation from the master's fill."""

from __future__ import annotations

from schemas.common import Side


def price_deviation(side: Side, master_price: float, bid: float, ask: float) -> float:
    """How much worse than the master's fill the follower would fill now (≥ 0 is worse)."""
    return ask - master_price if side is Side.BUY else master_price - bid


def within_deviation(
    side: Side, master_price: float, bid: float, ask: float, max_deviation: float | None
) -> bool:
    """The max-price-deviation rule, applied by connectors at execution time."""
    if max_deviation is None or master_price <= 0:
        return True
    return price_deviation(side, master_price, bid, ask) <= max_deviation + 1e-12
