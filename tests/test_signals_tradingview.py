"""TradingView alerts: parsing with named errors, constant-time secrets, dedup ids, intents."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import tradingview
from engine.core.errors import AlertError
from engine.core.tradingview import (
    AlertAction,
    IntentKind,
    MasterAction,
    MasterActionKind,
    TradingViewAlert,
    alert_id,
    intent_of,
    parse_alert,
    verify_secret,
)
from schemas.common import Side

BAR_TIME = "2026-02-16T02:15:00Z"


def strategy_message(
    action: str,
    prev: str,
    prev_size: float,
    now: str,
    now_size: float,
    contracts: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The body TradingView sends for the README's strategy alert message, filled in."""
    if contracts is None:
        signed = {"long": 1, "short": -1, "flat": 0}
        contracts = abs(signed[now] * now_size - signed[prev] * prev_size)
    return {
        "secret": "s3cret",
        "ticker": "XAUUSD",
        "time": BAR_TIME,
        "action": action,
        "contracts": str(contracts),
        "price": "5014.77",
        "order_id": "Long",
        "market_position": now,
        "market_position_size": str(now_size),
        "prev_market_position": prev,
        "prev_market_position_size": str(prev_size),
        **extra,
    }


def plain_message(action: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "secret": "s3cret",
        "ticker": "XAUUSD",
        "time": BAR_TIME,
        "action": action,
    }
    if action != "close":
        body["contracts"] = 0.5
    return body | extra


def parse(body: dict[str, Any]) -> TradingViewAlert:
    return parse_alert(json.dumps(body).encode())


def close(side: Side) -> MasterAction:
    return MasterAction(kind=MasterActionKind.CLOSE, side=side)


def open_(side: Side, volume: float) -> MasterAction:
    return MasterAction(kind=MasterActionKind.OPEN, side=side, volume=volume)


def add(side: Side, volume: float) -> MasterAction:
    return MasterAction(kind=MasterActionKind.ADD, side=side, volume=volume)


def reduce(side: Side, ratio: float) -> MasterAction:
    return MasterAction(kind=MasterActionKind.REDUCE, side=side, ratio=ratio)


BUY, SELL = Side.BUY, Side.SELL

# (order action, prev position, prev size, position, size, master's position) -> intent.
# The first ten are every transition a Pine strategy reports with the master in step; the
# rest are the master out of step with the strategy (a missed alert, an SL hit on the venue).
STRATEGY_TRANSITIONS = [
    ("buy", "flat", 0, "long", 1, 0.0, IntentKind.OPEN, (open_(BUY, 1.0),)),
    ("sell", "flat", 0, "short", 2, 0.0, IntentKind.OPEN, (open_(SELL, 2.0),)),
    ("buy", "long", 1, "long", 2, 1.0, IntentKind.ADD, (add(BUY, 1.0),)),
    ("sell", "short", 1, "short", 3, -1.0, IntentKind.ADD, (add(SELL, 2.0),)),
    ("sell", "long", 2, "long", 1, 2.0, IntentKind.REDUCE, (reduce(BUY, 0.5),)),
    ("buy", "short", 4, "short", 1, -4.0, IntentKind.REDUCE, (reduce(SELL, 0.75),)),
    ("sell", "long", 1, "flat", 0, 1.0, IntentKind.CLOSE, (close(BUY),)),
    ("buy", "short", 1, "flat", 0, -1.0, IntentKind.CLOSE, (close(SELL),)),
    ("sell", "long", 1, "short", 1, 1.0, IntentKind.REVERSE, (close(BUY), open_(SELL, 1.0))),
    ("buy", "short", 2, "long", 1, -2.0, IntentKind.REVERSE, (close(SELL), open_(BUY, 1.0))),
    # Master out of step: never double a position, never trade against the strategy.
    ("sell", "long", 1, "flat", 0, 0.0, IntentKind.NONE, ()),
    ("buy", "flat", 0, "long", 1, 3.0, IntentKind.NONE, ()),
    ("buy", "flat", 0, "long", 1, -1.0, IntentKind.REVERSE, (close(SELL), open_(BUY, 1.0))),
    ("buy", "long", 1, "long", 2, 0.0, IntentKind.OPEN, (open_(BUY, 2.0),)),
    ("sell", "long", 2, "long", 1, 0.0, IntentKind.NONE, ()),
    ("sell", "long", 2, "long", 1, -2.0, IntentKind.NONE, ()),
    ("sell", "long", 1, "short", 1, 0.0, IntentKind.OPEN, (open_(SELL, 1.0),)),
    ("sell", "long", 1, "short", 1, -1.0, IntentKind.NONE, ()),
    ("buy", "long", 1, "long", 2, -1.0, IntentKind.REVERSE, (close(SELL), open_(BUY, 2.0))),
    ("buy", "short", 1, "flat", 0, 2.0, IntentKind.CLOSE, (close(BUY),)),
]


@pytest.mark.parametrize(
    ("action", "prev", "prev_size", "now", "now_size", "master", "kind", "actions"),
    STRATEGY_TRANSITIONS,
)
def test_strategy_transitions_map_to_master_intents(
    action: str,
    prev: str,
    prev_size: float,
    now: str,
    now_size: float,
    master: float,
    kind: IntentKind,
    actions: tuple[MasterAction, ...],
) -> None:
    alert = parse(strategy_message(action, prev, prev_size, now, now_size))
    intent = intent_of(alert, master)
    assert intent.kind is kind
    assert intent.actions == actions


PLAIN_MESSAGES = [
    ("buy", 0.0, IntentKind.OPEN, (open_(BUY, 0.5),)),
    ("buy", 1.0, IntentKind.ADD, (add(BUY, 0.5),)),
    ("buy", -1.0, IntentKind.REVERSE, (close(SELL), open_(BUY, 0.5))),
    ("sell", 0.0, IntentKind.OPEN, (open_(SELL, 0.5),)),
    ("sell", -1.0, IntentKind.ADD, (add(SELL, 0.5),)),
    ("sell", 2.0, IntentKind.REVERSE, (close(BUY), open_(SELL, 0.5))),
    ("close", 2.0, IntentKind.CLOSE, (close(BUY),)),
    ("close", -2.0, IntentKind.CLOSE, (close(SELL),)),
    ("close", 0.0, IntentKind.NONE, ()),
]


@pytest.mark.parametrize(("action", "master", "kind", "actions"), PLAIN_MESSAGES)
def test_plain_buy_sell_close_messages_act_on_the_masters_position(
    action: str, master: float, kind: IntentKind, actions: tuple[MasterAction, ...]
) -> None:
    intent = intent_of(parse(plain_message(action)), master)
    assert intent.kind is kind
    assert intent.actions == actions


def test_stops_travel_with_the_opening_step_only() -> None:
    body = strategy_message("sell", "long", 1, "short", 1, sl="5030", tp="4990")
    intent = intent_of(parse(body), 1.0)
    assert intent.actions == (
        close(BUY),
        MasterAction(kind=MasterActionKind.OPEN, side=SELL, volume=1.0, sl=5030.0, tp=4990.0),
    )


def test_numbers_quoted_or_not_and_every_documented_field_parse() -> None:
    body = strategy_message("buy", "flat", 0, "long", 1) | {
        "contracts": 1,
        "market_position_size": 1,
        "prev_market_position_size": 0,
        "comment": "entry",
        "exchange": "OANDA",
        "interval": "15",
        "timenow": "2026-02-16T02:16:01Z",
        "sl": 5000,
        "tp": "5030.5",
        "id": "my-alert",
    }
    alert = parse(body)
    assert alert.action is AlertAction.BUY
    assert alert.contracts == 1.0 and alert.tp == 5030.5
    assert alert.bar_time_ns == 1_771_208_100_000_000_000
    assert alert.is_strategy_order


# (change to a valid message, the field the error must name, a word of the reason)
BAD_MESSAGES: list[tuple[dict[str, Any] | None, str, str, str]] = [
    (None, "$", "not json", "{not json"),
    (None, "$", "object", "[1, 2]"),
    (None, "$", "longer", json.dumps(plain_message("buy", comment="x" * 20_000))),
    ({"secret": None}, "secret", "", ""),
    ({"stop_loss": 5000}, "stop_loss", "misspelt", ""),
    ({"action": "{{strategy.order.action}}"}, "action", "not filled in", ""),
    ({"action": "hold"}, "action", "enum", ""),
    ({"time": "2026-02-16 02:15:00"}, "time", "zone", ""),
    ({"time": "yesterday"}, "time", "ISO 8601", ""),
    ({"time": 1771208100}, "time", "str", ""),
    ({"contracts": "abc"}, "contracts", "float", ""),
    ({"contracts": 0}, "contracts", "> 0", ""),
    ({"contracts": "NaN"}, "contracts", "", ""),
    ({"contracts": 1e300}, "contracts", "<=", ""),
    ({"ticker": ""}, "ticker", "length", ""),
    ({"sl": 5020, "price": 5010}, "sl", "below", ""),
    ({"tp": 5000, "price": 5010}, "tp", "above", ""),
    ({"market_position": "long"}, "market_position_size", "all four", ""),
]


@pytest.mark.parametrize(("change", "field", "reason", "raw"), BAD_MESSAGES)
def test_bad_plain_messages_name_the_field_and_the_reason(
    change: dict[str, Any] | None, field: str, reason: str, raw: str
) -> None:
    body = raw.encode() if change is None else plain_message("buy") | change
    if isinstance(body, dict):
        body = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    with pytest.raises(AlertError) as caught:
        parse_alert(body)
    assert caught.value.field == field
    assert reason.lower() in caught.value.reason.lower()


BAD_STRATEGY_MESSAGES = [
    (strategy_message("close", "long", 1, "flat", 0), "action", "buy or sell"),
    (strategy_message("sell", "long", 1, "flat", 1), "market_position_size", "flat"),
    (strategy_message("buy", "flat", 0, "long", 0, contracts=1), "market_position_size", "long"),
    (strategy_message("buy", "long", 2, "long", 1), "action", "does not move"),
    (strategy_message("sell", "long", 1, "short", 1, contracts=1), "contracts", "-1"),
    (strategy_message("buy", "long", 1, "long", 1, contracts=1), "market_position_size", "not"),
    (strategy_message("sell", "long", 1, "flat", 0, prev_market_position="up"), "", "enum"),
]


@pytest.mark.parametrize(("body", "field", "reason"), BAD_STRATEGY_MESSAGES)
def test_inconsistent_strategy_messages_name_the_field(
    body: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(AlertError) as caught:
        parse(body)
    assert caught.value.field == (field or "prev_market_position")
    assert reason.lower() in caught.value.reason.lower()


def test_plain_buy_without_a_volume_is_refused() -> None:
    body = plain_message("buy")
    del body["contracts"]
    with pytest.raises(AlertError) as caught:
        parse(body)
    assert caught.value.field == "contracts"


_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_FIELDS = list(msgspec.structs.fields(TradingViewAlert))
_field_names = st.sampled_from([f.name for f in _FIELDS]) | st.text(max_size=12)
_field_values = (
    _json
    | st.sampled_from(["buy", "sell", "close", "long", "short", "flat", BAR_TIME, "s3cret"])
    | st.floats(min_value=-10, max_value=10).map(str)
    | st.datetimes().map(lambda d: d.isoformat())
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_field_names, _field_values, max_size=len(_FIELDS)))
def test_any_object_either_parses_or_raises_alert_error(body: dict[str, Any]) -> None:
    try:
        alert = parse_alert(msgspec.json.encode(body))
    except AlertError as exc:
        assert exc.field and exc.reason
        return
    # Whatever parses also yields an id and an intent without raising.
    assert alert_id("src", alert).startswith("tv-")
    intent_of(alert, 0.0)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_json_value_either_parses_or_raises_alert_error(value: Any) -> None:
    with contextlib.suppress(AlertError):
        parse_alert(msgspec.json.encode(value))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_either_parse_or_raise_alert_error(body: bytes | str) -> None:
    with contextlib.suppress(AlertError):
        parse_alert(body)


def test_deep_nesting_is_an_alert_error() -> None:
    with pytest.raises(AlertError):
        parse_alert(b"[" * 5000 + b"]" * 5000)


def test_a_retried_or_refired_alert_keeps_its_id() -> None:
    body = strategy_message("buy", "flat", 0, "long", 1, timenow="2026-02-16T02:16:01Z")
    first = alert_id("gold-trend", parse(body))
    # The same webhook sent again; the same order fired again later in the bar (new price,
    # new fire time); the author's keys reordered and numbers unquoted.
    refired = body | {"timenow": "2026-02-16T02:16:09Z", "price": "5015.10", "comment": "again"}
    reordered = dict(reversed(list(body.items()))) | {"contracts": 1, "market_position_size": 1}
    for retry in (body, refired, reordered, body | {"secret": "rotated"}):
        assert alert_id("gold-trend", parse(retry)) == first


def test_a_new_alert_gets_a_new_id() -> None:
    body = strategy_message("buy", "flat", 0, "long", 1)
    first = alert_id("gold-trend", parse(body))
    different = [
        alert_id("other-source", parse(body)),
        alert_id("gold-trend", parse(body | {"time": "2026-02-16T02:30:00Z"})),
        alert_id("gold-trend", parse(body | {"ticker": "XAGUSD"})),
        alert_id("gold-trend", parse(body | {"order_id": "Long2"})),
        # Pyramiding: a second entry on the same bar, same order id, bigger position.
        alert_id("gold-trend", parse(strategy_message("buy", "long", 1, "long", 2))),
        alert_id("gold-trend", parse(strategy_message("sell", "long", 1, "flat", 0))),
    ]
    assert len({first, *different}) == 1 + len(different)


def test_plain_messages_fire_once_per_bar_unless_the_author_gives_an_id() -> None:
    body = plain_message("buy")
    assert alert_id("s", parse(body)) == alert_id("s", parse(body | {"timenow": "x"}))
    assert alert_id("s", parse(body)) != alert_id("s", parse(body | {"id": "second"}))
    assert alert_id("s", parse(body)) != alert_id("s", parse(plain_message("close")))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(STRATEGY_TRANSITIONS),
    st.permutations(range(11)),
    st.booleans(),
)
def test_alert_id_is_stable_under_reencoding(
    transition: tuple[Any, ...], order: list[int], quoted: bool
) -> None:
    action, prev, prev_size, now, now_size = transition[:5]
    body = strategy_message(action, prev, prev_size, now, now_size)
    items = list(body.items())
    shuffled = {items[i][0]: items[i][1] for i in order}
    if not quoted:
        shuffled = {
            k: (float(v) if k.endswith(("size", "contracts")) else v) for k, v in shuffled.items()
        }
    assert alert_id("src", parse(shuffled)) == alert_id("src", parse(body))


def test_secret_matches_only_the_configured_one() -> None:
    alert = parse(plain_message("buy"))
    assert verify_secret(alert, "s3cret")
    assert not verify_secret(alert, "s3cre")
    assert not verify_secret(alert, "s3cret ")
    assert not verify_secret(alert, "S3CRET")


def test_a_source_without_a_secret_accepts_nothing() -> None:
    # Built directly, past the parser's non-empty rule: the guard must not rely on it.
    alert = msgspec.structs.replace(parse(plain_message("buy")), secret="")
    assert not verify_secret(alert, "")


def test_secrets_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = tradingview.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tradingview.hmac, "compare_digest", spy)
    assert verify_secret(parse(plain_message("buy")), "s3cret")
    assert not verify_secret(parse(plain_message("buy", secret="wrong")), "s3cret")
    assert calls == [(b"s3cret", b"s3cret"), (b"wrong", b"s3cret")]


def test_a_secret_with_braces_is_a_secret_not_a_placeholder() -> None:
    assert verify_secret(parse(plain_message("buy", secret="{{abc}}")), "{{abc}}")


def test_non_ascii_secrets_compare() -> None:
    alert = parse(plain_message("buy", secret="clé-🔑"))
    assert verify_secret(alert, "clé-🔑")
    assert not verify_secret(alert, "cle-🔑")


def test_the_secret_never_shows_in_the_alerts_repr() -> None:
    alert = parse(plain_message("buy", secret="hunter2-very-secret"))
    assert "hunter2" not in repr(alert) and "hunter2" not in str(alert)
    assert "secret=***" in repr(alert) and "ticker='XAUUSD'" in repr(alert)


def apply(position: float, actions: tuple[MasterAction, ...]) -> float:
    """The master's signed position after the steps, as the paper venue would fill them."""
    for step in actions:
        sign = 1.0 if step.side is Side.BUY else -1.0
        if step.kind is MasterActionKind.CLOSE:
            assert position * sign > 0, "a close acts on a held position"
            position = 0.0
        elif step.kind is MasterActionKind.REDUCE:
            assert step.ratio is not None and 0.0 < step.ratio < 1.0
            assert position * sign > 0, "a reduce acts on a held position"
            position *= 1.0 - step.ratio
        else:
            assert step.volume is not None and step.volume > 0
            if step.kind is MasterActionKind.ADD:
                assert position * sign > 0, "an add grows a held position"
            else:
                assert position == 0.0, "an open starts from flat"
            position += sign * step.volume
    return position


_sizes = st.integers(0, 8).map(float)
_positions = st.sampled_from(["long", "short", "flat"])


@settings(max_examples=500, deadline=None)
@given(_positions, _sizes, _positions, _sizes, st.integers(-8, 8).map(float))
def test_intents_bring_the_master_where_the_strategy_went(
    prev: str, prev_size: float, now: str, now_size: float, master: float
) -> None:
    prev_size = 0.0 if prev == "flat" else prev_size or 1.0
    now_size = 0.0 if now == "flat" else now_size or 1.0
    signed = {"long": 1.0, "short": -1.0, "flat": 0.0}
    before, after = signed[prev] * prev_size, signed[now] * now_size
    if before == after:
        return
    action = "buy" if after > before else "sell"
    alert = parse(strategy_message(action, prev, prev_size, now, now_size))
    result = apply(master, intent_of(alert, master).actions)
    if master == before:
        # In step: the master ends exactly where the strategy is.
        assert result == pytest.approx(after)
    # Out of step: an entry or a reverse never stacks on a position already held (a missed
    # close must not double it); an add adds the strategy's difference, as copying does.
    if before == 0 or before * after < 0:
        assert abs(result) <= max(abs(master), abs(after))
    # Never ends opposite to the strategy unless left alone; a strategy gone flat leaves
    # the master flat.
    assert result * after >= 0 or result == master
    if after == 0:
        assert result == 0
