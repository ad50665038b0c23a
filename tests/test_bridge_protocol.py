"""Bridge protocol frames on the wire, the state hash both ends must compute alike, and the
CURVE keys and ZAP answers that decide who may speak it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, get_args

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from connectors.bridge.auth import TerminalAuthenticator
from connectors.bridge.hashing import (
    EMPTY_STATE_HASH,
    canonical_state,
    snapshot_state_hash,
    state_hash,
)
from connectors.bridge.paper_terminal import PaperBridgeTerminal
from connectors.paper.venue import PaperVenue
from schemas.bridge import (
    AccountUpdate,
    BridgeAccount,
    BridgeOrder,
    BridgePosition,
    BridgeSymbol,
    Command,
    CommandOp,
    CommandResult,
    ConnectorFrame,
    Denied,
    EventKind,
    Heartbeat,
    Hello,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    TerminalFrame,
    TradeEvent,
    Welcome,
    connector_frame_decoder,
    frame_encoder,
    terminal_frame_decoder,
)
from schemas.common import OrderType, Side

ACCOUNT = BridgeAccount(
    currency="USD",
    balance=10_000.0,
    equity=10_012.5,
    margin=501.07,
    free_margin=9_511.43,
    leverage=100,
)
POSITION = BridgePosition(
    ticket="1000002",
    symbol="XAUUSD",
    side=Side.BUY,
    volume=0.1,
    price=5010.69,
    sl=5000.5,
    magic=7,
    comment="copy:m1:42",
    time=1_771_207_620_000_000_000,
)
ORDER = BridgeOrder(
    ticket="1000010",
    symbol="XAUUSD",
    order_type=OrderType.BUY_LIMIT,
    volume=0.25,
    price=4990.0,
    tp=5050.0,
    expiration=1_771_300_000_000_000_000,
)

TERMINAL_FRAMES: list[Any] = [
    Hello(
        seq=1,
        ts=5,
        version=1,
        account="acct-1",
        token="secret",
        platform="mt5",
        session="3f2a",
        ea_version="1.02",
    ),
    Snapshot(
        seq=2,
        account=ACCOUNT,
        positions=[POSITION],
        orders=[ORDER],
        symbols=[
            BridgeSymbol(
                symbol="XAUUSD",
                contract_size=100.0,
                tick_size=0.01,
                tick_value=1.0,
                digits=2,
                volume_min=0.01,
                volume_max=100.0,
                volume_step=0.01,
                filling="fok",
            )
        ],
    ),
    Snapshot(seq=3, corr="req-9", account=ACCOUNT),
    *[
        TradeEvent(
            seq=4 + i,
            kind=kind,
            ticket="1000002",
            symbol="XAUUSD",
            side=Side.BUY,
            volume=0.04,
            volume_before=0.1,
            volume_after=0.06,
            price=5011.0,
            sl=5000.5,
            tp=None,
            magic=7,
            comment="copy:m1:42",
            new_ticket="2000000001",
            opposite_ticket="1000003",
            position_ticket="1000002",
            order_type=OrderType.BUY_STOP,
            reason="sl",
            expiration=9,
            time=11,
        )
        for i, kind in enumerate(EventKind)
    ],
    AccountUpdate(seq=20, account=ACCOUNT, positions=3),
    CommandResult(
        seq=21,
        corr="ord-1",
        ok=True,
        retcode=10009,
        ticket="1000002",
        price=5010.69,
        volume=0.1,
        time=12,
    ),
    CommandResult(seq=22, corr="ord-2", ok=False, retcode=10019, reason="not enough money"),
    Heartbeat(seq=23, state_hash=EMPTY_STATE_HASH),
    ProtocolError(seq=24, reason="undecodable frame", ref_seq=7),
]
CONNECTOR_FRAMES: list[Any] = [
    Welcome(seq=1, heartbeat_ms=500),
    Denied(seq=1, reason="bad token"),
    *[
        Command(
            seq=2 + i,
            corr=f"ord-{i}",
            op=op,
            symbol="XAUUSD",
            side=Side.SELL,
            order_type=OrderType.SELL_LIMIT,
            volume=0.3,
            price=5020.0,
            sl=5030.0,
            tp=None,
            deviation_points=20,
            magic=3,
            comment="copy:m1:9",
            ticket="1000002",
            opposite_ticket="1000003",
            expiration=99,
        )
        for i, op in enumerate(CommandOp)
    ],
    SnapshotRequest(seq=10, corr="gap-1"),
    Heartbeat(seq=11),
    ProtocolError(seq=12, reason="unknown session"),
]


def test_the_samples_cover_every_frame_type_and_every_kind() -> None:
    assert {type(f) for f in TERMINAL_FRAMES} == set(get_args(TerminalFrame))
    assert {type(f) for f in CONNECTOR_FRAMES} == set(get_args(ConnectorFrame))
    assert {f.kind for f in TERMINAL_FRAMES if isinstance(f, TradeEvent)} == set(EventKind)
    assert {f.op for f in CONNECTOR_FRAMES if isinstance(f, Command)} == set(CommandOp)


@pytest.mark.parametrize("frame", TERMINAL_FRAMES, ids=lambda f: type(f).__name__)
def test_terminal_frames_round_trip(frame: Any) -> None:
    raw = frame_encoder.encode(frame)
    assert terminal_frame_decoder.decode(raw) == frame
    assert json.loads(raw)["t"] == type(frame).__struct_config__.tag


@pytest.mark.parametrize("frame", CONNECTOR_FRAMES, ids=lambda f: type(f).__name__)
def test_connector_frames_round_trip(frame: Any) -> None:
    raw = frame_encoder.encode(frame)
    assert connector_frame_decoder.decode(raw) == frame
    assert json.loads(raw)["t"] == type(frame).__struct_config__.tag


def test_defaults_stay_off_the_wire() -> None:
    assert json.loads(frame_encoder.encode(Heartbeat(seq=3))) == {"t": "hb", "seq": 3}
    assert json.loads(frame_encoder.encode(Welcome(seq=1))) == {"t": "welcome", "seq": 1}


def test_json_as_the_ea_writes_it_decodes() -> None:
    # MQL writes integers where it has no decimals and 0 for "no SL".
    raw = (
        b'{"t":"event","seq":3,"ts":1,"kind":"opened","ticket":"1000002","symbol":"XAUUSD",'
        b'"side":"buy","volume":1,"price":5010,"sl":0,"tp":5050.5,"magic":0,"comment":"",'
        b'"time":1771207620000000000}'
    )
    event = terminal_frame_decoder.decode(raw)
    assert isinstance(event, TradeEvent)
    assert (event.volume, event.price, event.sl, event.tp) == (1.0, 5010.0, 0.0, 5050.5)


def test_a_frame_for_the_other_direction_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        terminal_frame_decoder.decode(frame_encoder.encode(Welcome(seq=1)))
    with pytest.raises(msgspec.ValidationError):
        connector_frame_decoder.decode(frame_encoder.encode(TERMINAL_FRAMES[0]))


BAD_TERMINAL_FRAMES = {
    "unknown tag": {"t": "launch", "seq": 1},
    "no tag": {"seq": 1, "state_hash": ""},
    "seq zero": {"t": "hb", "seq": 0},
    "seq as string": {"t": "hb", "seq": "1"},
    "ticket as number": {
        "t": "event",
        "seq": 1,
        "kind": "opened",
        "ticket": 1000002,
        "symbol": "XAUUSD",
    },
    "unknown event kind": {
        "t": "event",
        "seq": 1,
        "kind": "teleported",
        "ticket": "1",
        "symbol": "XAUUSD",
    },
    "volume as string": {
        "t": "event",
        "seq": 1,
        "kind": "opened",
        "ticket": "1",
        "symbol": "XAUUSD",
        "volume": "0.1",
    },
    "oversized ticket": {
        "t": "event",
        "seq": 1,
        "kind": "opened",
        "ticket": "9" * 33,
        "symbol": "XAUUSD",
    },
    "oversized comment": {
        "t": "event",
        "seq": 1,
        "kind": "opened",
        "ticket": "1",
        "symbol": "XAUUSD",
        "comment": "c" * 257,
    },
    "oversized result corr": {"t": "result", "seq": 1, "corr": "x" * 129, "ok": True},
    "empty result corr": {"t": "result", "seq": 1, "corr": "", "ok": True},
    "oversized account": {
        "t": "hello",
        "seq": 1,
        "version": 1,
        "account": "a" * 65,
        "token": "t",
        "platform": "mt5",
        "session": "s",
    },
    "oversized session": {
        "t": "hello",
        "seq": 1,
        "version": 1,
        "account": "a",
        "token": "t",
        "platform": "mt5",
        "session": "s" * 65,
    },
    "oversized token": {
        "t": "hello",
        "seq": 1,
        "version": 1,
        "account": "a",
        "token": "t" * 257,
        "platform": "mt5",
        "session": "s",
    },
    "unknown platform": {
        "t": "hello",
        "seq": 1,
        "version": 1,
        "account": "a",
        "token": "t",
        "platform": "mt6",
        "session": "s",
    },
    "snapshot without account": {"t": "snapshot", "seq": 1},
}
BAD_CONNECTOR_FRAMES = {
    "unknown tag": {"t": "event", "seq": 1},
    "oversized corr": {"t": "cmd", "seq": 1, "corr": "x" * 129, "op": "open", "symbol": "XAUUSD"},
    "unknown op": {"t": "cmd", "seq": 1, "corr": "c", "op": "sell_everything", "symbol": "XAUUSD"},
    "oversized symbol": {"t": "cmd", "seq": 1, "corr": "c", "op": "open", "symbol": "S" * 65},
    "side as number": {
        "t": "cmd",
        "seq": 1,
        "corr": "c",
        "op": "open",
        "symbol": "XAUUSD",
        "side": 0,
    },
    "heartbeat_ms as float": {"t": "welcome", "seq": 1, "heartbeat_ms": 1.5},
    "denied without reason": {"t": "denied", "seq": 1},
}


@pytest.mark.parametrize("name", BAD_TERMINAL_FRAMES)
def test_invalid_terminal_frames_are_validation_errors(name: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        terminal_frame_decoder.decode(json.dumps(BAD_TERMINAL_FRAMES[name]).encode())


@pytest.mark.parametrize("name", BAD_CONNECTOR_FRAMES)
def test_invalid_connector_frames_are_validation_errors(name: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        connector_frame_decoder.decode(json.dumps(BAD_CONNECTOR_FRAMES[name]).encode())


DECODE_FAILURES = (msgspec.DecodeError, UnicodeDecodeError)  # ValidationError is a DecodeError


def _decode_or_fail_cleanly(raw: bytes) -> None:
    for decoder in (terminal_frame_decoder, connector_frame_decoder):
        with contextlib.suppress(DECODE_FAILURES):
            decoder.decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_fail_to_decode(raw: bytes) -> None:
    _decode_or_fail_cleanly(raw)


_TAGS = [
    "hello",
    "snapshot",
    "event",
    "account",
    "result",
    "hb",
    "error",
    "welcome",
    "denied",
    "cmd",
    "snapshot_req",
    "nonsense",
]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    [
        "seq",
        "ts",
        "corr",
        "op",
        "kind",
        "ticket",
        "symbol",
        "side",
        "volume",
        "price",
        "sl",
        "account",
        "positions",
        "orders",
        "reason",
        "version",
        "token",
        "session",
        "platform",
        "state_hash",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_TAGS), st.dictionaries(_FIELDS, _JSON, max_size=8))
def test_frame_shaped_json_only_ever_fails_to_decode(tag: str, fields: dict[str, Any]) -> None:
    _decode_or_fail_cleanly(json.dumps({"t": tag, **fields}).encode())


# ------------------------------------------------------------------ state hash


def test_the_documented_example_hashes_to_its_canonical_string() -> None:
    canonical = "P:1000002:0.1:5000.5:0;O:1000010:0.25:4990:0:5050;"
    assert canonical_state([POSITION], [ORDER]) == canonical
    assert state_hash([POSITION], [ORDER]) == hashlib.sha256(canonical.encode()).hexdigest()
    assert state_hash([POSITION], [ORDER]) == (
        "9e06a8d69d23dbf1062d228006cab00e1fd1f38a71286ff607da0e015187dfa4"
    )


def test_an_empty_terminal_hashes_the_empty_string() -> None:
    assert state_hash([], []) == EMPTY_STATE_HASH == hashlib.sha256(b"").hexdigest()


def test_tickets_sort_numerically_positions_before_orders() -> None:
    short = msgspec.structs.replace(POSITION, ticket="999", sl=None, tp=2.5)
    order = msgspec.structs.replace(ORDER, ticket="5")
    assert canonical_state([POSITION, short], [order]) == (
        "P:999:0.1:0:2.5;P:1000002:0.1:5000.5:0;O:5:0.25:4990:0:5050;"
    )


def test_float_noise_and_missing_levels_do_not_change_the_hash() -> None:
    noisy = msgspec.structs.replace(POSITION, volume=0.1 + 0.2 - 0.2, tp=0.0)
    assert state_hash([noisy], []) == state_hash([POSITION], [])


def test_volume_and_level_changes_change_the_hash() -> None:
    base = state_hash([POSITION], [ORDER])
    for changed in (
        ([msgspec.structs.replace(POSITION, volume=0.06)], [ORDER]),
        ([msgspec.structs.replace(POSITION, sl=5000.51)], [ORDER]),
        ([POSITION], [msgspec.structs.replace(ORDER, price=4990.01)]),
        ([POSITION], []),
    ):
        assert state_hash(*changed) != base


def test_snapshot_state_hash_hashes_its_positions_and_orders() -> None:
    snapshot = TERMINAL_FRAMES[1]
    assert snapshot_state_hash(snapshot) == state_hash([POSITION], [ORDER])


@settings(max_examples=100, deadline=None)
@given(st.permutations([msgspec.structs.replace(POSITION, ticket=str(t)) for t in (7, 70, 700, 8)]))
def test_the_hash_does_not_depend_on_listing_order(positions: list[BridgePosition]) -> None:
    assert state_hash(positions, []) == state_hash(reversed(positions), [])


# ------------------------------------------------------------------ CURVE and ZAP


def _authenticator(refused: list[tuple[str, str]]) -> tuple[TerminalAuthenticator, bytes]:
    public, _ = zmq.curve_keypair()
    key = z85.decode(public)

    def refuse(address: str, shown: str) -> None:
        refused.append((address, shown))

    return TerminalAuthenticator(zmq.asyncio.Context.instance(), {key: "acc-1"}, refuse), key


def _zap_request(mechanism: bytes, *credentials: bytes, version: bytes = b"1.0") -> list[bytes]:
    """A ZAP request as libzmq sends it (RFC 27), behind a ROUTER's envelope."""
    return [b"peer", b"", version, b"7", b"", b"10.0.0.9", b"", mechanism, *credentials]


def test_zap_admits_a_listed_key_and_names_its_account_as_the_user_id() -> None:
    refused: list[tuple[str, str]] = []
    authenticator, key = _authenticator(refused)
    reply = authenticator.answer(_zap_request(b"CURVE", key))
    assert reply == [b"peer", b"", b"1.0", b"7", b"200", b"OK", b"acc-1", b""]
    assert refused == []


def test_zap_refuses_unlisted_keys_and_every_other_mechanism() -> None:
    refused: list[tuple[str, str]] = []
    authenticator, key = _authenticator(refused)
    stranger = z85.decode(zmq.curve_keypair()[0])
    requests = [
        _zap_request(b"CURVE", stranger),
        _zap_request(b"NULL"),
        _zap_request(b"PLAIN", b"acc-1", b"password"),
        _zap_request(b"CURVE", key[:31]),
        _zap_request(b"CURVE", key, key),
    ]
    for request in requests:
        reply = authenticator.answer(request)
        assert reply is not None and reply[4] == b"400" and reply[6] == b"", request
    assert refused[0] == ("10.0.0.9", z85.encode(stranger).decode())
    assert [shown for _, shown in refused[1:]] == ["NULL", "PLAIN", "CURVE", "CURVE"]
    wrong_version = authenticator.answer(_zap_request(b"CURVE", key, version=b"2.0"))
    assert wrong_version is not None and wrong_version[4] == b"500"
    assert authenticator.answer([b"peer", b"no delimiter"]) is None


@pytest.mark.parametrize(
    "keys",
    [
        {"server_key": "too-short", "public_key": "x" * 40, "secret_key": "x" * 40},
        {"server_key": "x" * 40, "public_key": "~" * 40, "secret_key": "x" * 40},
        {"server_key": "x" * 40, "public_key": "x" * 40, "secret_key": ""},
        {"server_key": "x" * 40, "public_key": " " + "x" * 40, "secret_key": "y" * 40},
        {"public_key": "x" * 40, "secret_key": "x" * 40},
        {},
    ],
)
def test_the_paper_terminal_takes_z85_keys_or_an_explicit_plaintext(keys: dict[str, str]) -> None:
    """As the EA: three 40-character Z85 keys, or no server key and ``plaintext``."""
    with pytest.raises(ValueError, match=r"Z85|server key|its own pair"):
        PaperBridgeTerminal("tcp://127.0.0.1:1", "acc-1", "t" * 16, PaperVenue(), **keys)
    if "server_key" not in keys:
        PaperBridgeTerminal("tcp://127.0.0.1:1", "acc-1", "t" * 16, PaperVenue(),
                            plaintext=True, **keys)  # fmt: skip
