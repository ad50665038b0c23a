"""Link files: the documented example, every-field error reports, fuzzed input, applying to KV."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext

from engine.cli import main
from engine.core.errors import LinkFileError
from engine.runtime.jetstream import ensure_buckets, live_keys
from engine.runtime.links import LinkError, apply_links, load_links, validate_link
from schemas import codec, subjects
from schemas.links import CopyLink, Sizing, SymbolMapping, TradingHours

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
EXAMPLE = EXAMPLES / "links.toml"

SIZING_MODES = {cls.__struct_config__.tag for cls in get_args(Sizing)}
LINK_FIELDS = set(CopyLink.__struct_fields__)


def _write(tmp_path: Path, text: str, name: str = "links.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _errors(path: Path) -> list[LinkError]:
    with pytest.raises(LinkFileError) as info:
        load_links(path)
    errors = info.value.errors
    assert errors, "LinkFileError without errors"
    assert all(isinstance(e, LinkError) for e in errors)
    return errors  # type: ignore[return-value]


def _valid(**overrides: Any) -> dict[str, Any]:
    return {"link_id": "ok", "master": "m-1", "follower": "f-1", **overrides}


# --------------------------------------------------------------------------------------------
# The documented example
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_file_loads_and_every_link_is_valid(path: Path) -> None:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    links = load_links(path)

    assert links
    assert len(links) == len(raw["links"])
    for index, table in enumerate(raw["links"]):
        link, errors = validate_link(table, index)
        assert errors == []
        assert link == links[index]
    assert len({link.link_id for link in links}) == len(links)


def test_example_covers_every_sizing_mode() -> None:
    modes = {link.sizing.__struct_config__.tag for link in load_links(EXAMPLE)}
    assert modes == SIZING_MODES


def test_example_sets_every_link_field_explicitly() -> None:
    """The example doubles as the reference: every field (and sub-field) appears at least once."""
    tables = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["links"]
    used = set().union(*(table.keys() for table in tables))
    assert LINK_FIELDS - used == set()

    mapping_keys = set().union(*(t.get("symbol_mapping", {}).keys() for t in tables))
    assert set(SymbolMapping.__struct_fields__) - mapping_keys == set()
    hours_keys = set().union(*(t.get("trading_hours", {}).keys() for t in tables))
    assert set(TradingHours.__struct_fields__) - hours_keys == set()
    sizing_keys = set().union(*(t.get("sizing", {}).keys() for t in tables))
    every_sizing_field = set().union(*(c.__struct_fields__ for c in get_args(Sizing)))
    assert (every_sizing_field | {"mode"}) - sizing_keys == set()


def test_example_uses_every_enum_value_of_filters_and_protection() -> None:
    links = load_links(EXAMPLE)
    for field in ("below_min", "direction", "deviation_policy", "protection_action"):
        enum_type = type(getattr(links[0], field))
        assert {getattr(link, field) for link in links} == set(enum_type), field
    assert {link.enabled for link in links} == {True, False}
    assert {link.reverse for link in links} == {True, False}
    # A trading window that spans midnight and one that does not.
    windows = [link.trading_hours for link in links if link.trading_hours is not None]
    assert any(w.end < w.start for w in windows)
    assert any(w.start < w.end for w in windows)


def test_cli_validates_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["links", "validate", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert f"{len(load_links(EXAMPLE))} link(s) valid" in out


# --------------------------------------------------------------------------------------------
# Every invalid field is reported, located by link index, link id and field path
# --------------------------------------------------------------------------------------------

BROKEN = """\
    setting = "top-level keys other than [[links]] are rejected"

    [[links]]
    link_id = "a"
    master = "alpari 1001"            # space: not an account id
    follower = "icm-2002"
    colour = "blue"                   # unknown field
    enabled = "yes"                   # wrong type
    max_lot = -1.0                    # negative
    max_open_positions = 0            # zero
    sizing = { mode = "martingale" }  # unknown sizing mode
    trading_hours = { start = "25:00", end = "10:00" }

    [[links]]
    link_id = "b"
    master = "alpari-1001"
    # follower missing
    sizing = { mode = "multiplier", factor = 0.0 }
    trading_hours = { start = "08:00", end = "10:00", timezone = "Mars/Olympus_Mons" }
    symbols_include = "EURUSD"        # a string, not a list
    daily_loss_percent = 150.0        # above 100
    magic_include = [1, "two"]

    [[links]]
    link_id = "c"
    master = "same-1"
    follower = "same-1"

    [[links]]
    link_id = "d"
    master = "alpari-1001"
    follower = "icm-2002"
    symbols_include = ["EURUSD", "XAUUSD"]
    symbols_exclude = ["xauusd"]

    [[links]]
    link_id = "e"
    master = "alpari-1001"
    follower = "icm-2002"

    [[links]]
    link_id = "e"
    master = "alpari-1001"
    follower = "fxpro-3003"
"""


def test_every_invalid_field_is_reported_with_its_location(tmp_path: Path) -> None:
    errors = _errors(_write(tmp_path, BROKEN))
    by_where = {e.where: e.message for e in errors}

    # Field errors: one per field, located down to the sub-field where msgspec knows it.
    expected_where = {
        "setting",
        "links[0] (a).colour",
        "links[0] (a).master",
        "links[0] (a).enabled",
        "links[0] (a).max_lot",
        "links[0] (a).max_open_positions",
        "links[0] (a).sizing.mode",
        "links[0] (a).trading_hours.start",
        "links[1] (b).follower",
        "links[1] (b).sizing.factor",
        "links[1] (b).trading_hours.timezone",
        "links[1] (b).symbols_include",
        "links[1] (b).daily_loss_percent",
        "links[1] (b).magic_include[1]",
        "links[2] (c).follower",
        "links[3] (d).symbols_exclude",
        "links[5] (e).link_id",
    }
    assert set(by_where) == expected_where
    assert len(errors) == len(expected_where)  # nothing reported twice

    assert "unknown top-level key" in by_where["setting"]
    assert by_where["links[0] (a).colour"] == "unknown field"
    assert "regex" in by_where["links[0] (a).master"]
    assert "bool" in by_where["links[0] (a).enabled"]
    assert "> 0" in by_where["links[0] (a).max_lot"]
    assert ">= 1" in by_where["links[0] (a).max_open_positions"]
    assert "martingale" in by_where["links[0] (a).sizing.mode"]
    assert "`start`" in by_where["links[0] (a).trading_hours.start"]
    assert "25:00" in by_where["links[0] (a).trading_hours.start"]
    assert by_where["links[1] (b).follower"] == "required field is missing"
    assert "> 0" in by_where["links[1] (b).sizing.factor"]
    assert "Mars/Olympus_Mons" in by_where["links[1] (b).trading_hours.timezone"]
    assert "`timezone`" in by_where["links[1] (b).trading_hours.timezone"]
    assert "array" in by_where["links[1] (b).symbols_include"]
    assert "<= 100" in by_where["links[1] (b).daily_loss_percent"]
    assert "int" in by_where["links[1] (b).magic_include[1]"]
    # Cross-field rules name the fields involved in the message.
    assert "`follower`" in by_where["links[2] (c).follower"]
    assert "`master`" in by_where["links[2] (c).follower"]
    assert "`symbols_exclude`" in by_where["links[3] (d).symbols_exclude"]
    assert "XAUUSD" in by_where["links[3] (d).symbols_exclude"]
    assert by_where["links[5] (e).link_id"] == "duplicate of links[4]"


def test_the_exception_text_lists_every_error(tmp_path: Path) -> None:
    path = _write(tmp_path, BROKEN)
    with pytest.raises(LinkFileError) as info:
        load_links(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {len(info.value.errors)} invalid field(s)")
    for error in info.value.errors:
        assert f"  - {error}" in text.splitlines()


def test_invalid_toml_syntax_is_one_located_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        [[links]]
        link_id = "a"
        master = "alpari-1001
        follower = "icm-2002"
        """,
    )
    errors = _errors(path)
    assert len(errors) == 1
    assert errors[0].where == "file"
    assert "not valid TOML" in errors[0].message
    assert "line 3" in errors[0].message


def test_links_must_be_an_array_of_tables(tmp_path: Path) -> None:
    errors = _errors(_write(tmp_path, 'links = "gold"\n'))
    assert [(e.where, e.message) for e in errors] == [
        ("links", "must be an array of tables ([[links]])")
    ]
    errors = _errors(_write(tmp_path, "links = [1, 2]\n"))
    assert [str(e) for e in errors] == [
        "links[0]: must be a table, got int",
        "links[1]: must be a table, got int",
    ]


def test_an_empty_file_has_no_links(tmp_path: Path) -> None:
    assert load_links(_write(tmp_path, "")) == []


def test_a_missing_link_id_is_labelled_by_index_only() -> None:
    link, errors = validate_link({"master": "m-1", "follower": "f-1"}, 7)
    assert link is None
    assert [str(e) for e in errors] == ["links[7].link_id: required field is missing"]


@pytest.mark.parametrize(
    ("overrides", "where", "fragment"),
    [
        ({"link_id": "has space"}, "links[0] (has space).link_id", "regex"),
        ({"link_id": "x" * 65}, "links[0] (" + "x" * 65 + ").link_id", "regex"),
        ({"follower": "a.b"}, "links[0] (ok).follower", "regex"),
        ({"follower": ""}, "links[0] (ok).follower", "regex"),
        ({"sizing": {"mode": "fixed_lot"}}, "links[0] (ok).sizing", "`lots`"),
        ({"sizing": {"mode": "fixed_lot", "lots": -0.1}}, "links[0] (ok).sizing.lots", "> 0"),
        ({"sizing": {"factor": 2.0}}, "links[0] (ok).sizing", "`mode`"),
        ({"sizing": {"mode": "risk_percent", "percent": 0}}, "links[0] (ok).sizing.percent", "> 0"),
        (
            {"sizing": {"mode": "risk_amount", "amount": 10, "currency": "eur"}},
            "links[0] (ok).sizing.currency",
            "regex",
        ),
        ({"sizing": {"mode": "multiplier", "lots": 1}}, "links[0] (ok).sizing", "`lots`"),
        ({"below_min": "round_up"}, "links[0] (ok).below_min", "round_up"),
        ({"direction": "long"}, "links[0] (ok).direction", "long"),
        ({"deviation_wait_ms": 60_001}, "links[0] (ok).deviation_wait_ms", "<= 60000"),
        ({"deviation_wait_ms": -1}, "links[0] (ok).deviation_wait_ms", ">= 0"),
        ({"max_signal_age_ms": 1.5}, "links[0] (ok).max_signal_age_ms", "int"),
        ({"equity_stop": 0}, "links[0] (ok).equity_stop", "> 0"),
        ({"max_drawdown_percent": -5}, "links[0] (ok).max_drawdown_percent", "> 0"),
        ({"protection_action": "liquidate"}, "links[0] (ok).protection_action", "liquidate"),
        ({"symbol_mapping": {"pairs": {"GOLD": 1}}}, "links[0] (ok).symbol_mapping", "str"),
        ({"symbol_mapping": {"suffix": ".m"}}, "links[0] (ok).symbol_mapping", "`suffix`"),
        (
            {"trading_hours": {"start": "08:00", "end": "10:00", "days": [0]}},
            "links[0] (ok).trading_hours.days[0]",
            ">= 1",
        ),
        (
            {"trading_hours": {"start": "8:00", "end": "10:00"}},
            "links[0] (ok).trading_hours",
            "HH:MM",
        ),
        (
            {"trading_hours": {"start": "08:00", "end": "10:60"}},
            "links[0] (ok).trading_hours",
            "`end`",
        ),
        ({"trading_hours": {"start": "08:00"}}, "links[0] (ok).trading_hours", "`end`"),
    ],
)
def test_single_invalid_field_is_located(
    overrides: dict[str, Any], where: str, fragment: str
) -> None:
    link, errors = validate_link(_valid(**overrides), 0)
    assert link is None
    assert len(errors) == 1
    assert errors[0].where.startswith(where)
    # The field is named either by the location (``...sizing.lots``) or by the message.
    assert fragment.strip("`") in errors[0].where or fragment in errors[0].message


# Edge cases that once crashed or slipped through validation.


@pytest.mark.parametrize("timezone", ["America", "Europe", "Etc", "x" * 300])
def test_a_time_zone_that_is_a_directory_or_too_long_is_reported(timezone: str) -> None:
    raw = _valid(trading_hours={"start": "08:00", "end": "10:00", "timezone": timezone})
    link, errors = validate_link(raw, 0)
    assert link is None
    assert len(errors) == 1
    assert errors[0].where.startswith("links[0] (ok).trading_hours")


@pytest.mark.parametrize(
    "overrides",
    [
        {"link_id": "ok\n"},
        {"master": "m-1\n"},
        {"follower": "f-1\n"},
        {"trading_hours": {"start": "08:00\n", "end": "10:00"}},
    ],
    ids=["link_id", "master", "follower", "trading_hours.start"],
)
def test_a_trailing_newline_is_not_a_valid_id_or_time(overrides: dict[str, Any]) -> None:
    link, errors = validate_link(_valid(**overrides), 0)
    assert link is None
    assert errors


@pytest.mark.parametrize(
    "overrides", [{"magic": 2**64}, {"magic_include": [2**64]}, {"magic_exclude": [-(2**63) - 1]}]
)
def test_a_valid_link_always_encodes(overrides: dict[str, Any]) -> None:
    link, errors = validate_link(_valid(**overrides), 0)
    if link is None:
        assert errors
        return
    assert codec.copy_link_decoder.decode(codec.encode(link)) == link


@pytest.mark.parametrize(
    ("table", "value", "invalid"),
    [
        (
            "trading_hours",
            {"start": "25:00", "end": "24:00", "timezone": "Mars/Olympus_Mons"},
            ["start", "end", "timezone"],
        ),
        ("sizing", {"mode": "fixed_lot", "lots": -1.0, "extra": 1}, ["lots", "extra"]),
    ],
)
def test_every_invalid_sub_field_of_a_table_is_reported(
    table: str, value: dict[str, Any], invalid: list[str]
) -> None:
    _, errors = validate_link(_valid(**{table: value}), 0)
    assert len(errors) == len(invalid)
    for name in invalid:
        assert any(name in str(e) for e in errors), name


def test_cross_field_errors_are_reported_together_with_field_errors() -> None:
    _, errors = validate_link(_valid(follower="m-1", max_lot=-1.0), 0)
    assert any(e.where.endswith(".max_lot") for e in errors)
    assert any("`follower` must differ" in str(e) for e in errors)


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"trading_hours": {"start": "25:00", "end": "10:00"}}, ".trading_hours.start"),
        (
            {"trading_hours": {"start": "08:00", "end": "10:00", "timezone": "Mars/X"}},
            ".trading_hours.timezone",
        ),
        ({"follower": "m-1"}, ".follower"),
        ({"symbols_include": ["EURUSD"], "symbols_exclude": ["EURUSD"]}, ".symbols_exclude"),
    ],
)
def test_post_init_errors_point_at_the_field(overrides: dict[str, Any], path: str) -> None:
    _, errors = validate_link(_valid(**overrides), 0)
    assert [e.where for e in errors] == [f"links[0] (ok){path}"]


# --------------------------------------------------------------------------------------------
# validate_link never crashes
# --------------------------------------------------------------------------------------------

SUB_KEYS = [
    "mode",
    "factor",
    "lots",
    "percent",
    "amount",
    "currency",
    "start",
    "end",
    "timezone",
    "days",
    "pairs",
    *SymbolMapping.__struct_fields__,
]
PLAUSIBLE_STRINGS = [
    *sorted(SIZING_MODES),
    "skip",
    "force_min",
    "both",
    "buy_only",
    "sell_only",
    "wait",
    "pause",
    "close_all",
    "08:00",
    "23:59",
    "24:00",
    "25:00",
    "8:00",
    "Europe/Berlin",
    "UTC",
    "Mars/Olympus_Mons",
    "EUR",
    "eur",
    "EURUSD",
    "usdjpy.",
    "acc-1",
    "acc 1",
    "",
]
keys = st.sampled_from(sorted(LINK_FIELDS) + SUB_KEYS) | st.text(max_size=8)
# Text stays short to keep the examples fast; over-long zone names have their own test.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=16)
    | st.sampled_from(PLAUSIBLE_STRINGS)
    | st.datetimes()
    | st.dates()
    | st.times()
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=12,
)
sizing_tables = st.fixed_dictionaries(
    {"mode": st.sampled_from(sorted(SIZING_MODES))},
    optional={
        "factor": scalars,
        "lots": scalars,
        "percent": scalars,
        "amount": scalars,
        "currency": scalars,
    },
)
hours_tables = st.fixed_dictionaries(
    {},
    optional={
        "start": st.sampled_from(PLAUSIBLE_STRINGS) | st.text(max_size=6),
        "end": st.sampled_from(PLAUSIBLE_STRINGS) | st.text(max_size=6),
        "timezone": st.sampled_from(PLAUSIBLE_STRINGS) | st.text(max_size=16),
        "days": st.lists(st.integers(-1, 9), max_size=8) | values,
    },
)
nearly_valid = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries(
        {
            "link_id": st.sampled_from(["gold-x2", "e", "bad id"]),
            "master": st.sampled_from(["m-1", "f-1"]),
            "follower": st.sampled_from(["f-1", "m-1"]),
        }
    ),
    st.dictionaries(
        st.sampled_from(sorted(LINK_FIELDS)),
        values | sizing_tables | hours_tables,
        max_size=6,
    ),
)
raw_links = nearly_valid | st.dictionaries(keys, values, max_size=10) | values


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_links, index=st.integers(0, 1000))
def test_validate_link_returns_a_link_or_errors_and_never_raises(raw: Any, index: int) -> None:
    link, errors = validate_link(raw, index)
    if link is None:
        assert errors
        assert all(isinstance(e, LinkError) for e in errors)
        assert all(e.where.startswith(f"links[{index}]") for e in errors)
        assert all(e.message for e in errors)
    else:
        assert errors == []
        assert isinstance(link, CopyLink)
        # A link that validates is the link msgspec builds from the same table.
        assert msgspec.convert(raw, CopyLink) == link


# --------------------------------------------------------------------------------------------
# apply_links against a real nats-server
# --------------------------------------------------------------------------------------------


async def _stored(js: JetStreamContext) -> dict[str, CopyLink]:
    kv = await js.key_value(subjects.KV_LINKS)
    keys = await live_keys(js, kv, subjects.KV_LINKS)
    return {key: codec.copy_link_decoder.decode((await kv.get(key)).value) for key in keys}


async def test_apply_creates_then_leaves_unchanged_then_updates_then_prunes(
    js: JetStreamContext,
) -> None:
    links = load_links(EXAMPLE)
    ids = [link.link_id for link in links]
    kv = (await ensure_buckets(js))[subjects.KV_LINKS]

    first = await apply_links(kv, links)
    assert (first.created, first.updated, first.unchanged, first.removed) == (ids, [], [], [])
    assert await _stored(js) == {link.link_id: link for link in links}

    again = await apply_links(kv, links)
    assert (again.created, again.updated, again.unchanged, again.removed) == ([], [], ids, [])

    changed = msgspec.structs.replace(links[0], max_lot=0.25, enabled=False)
    edited = [changed, *links[1:]]
    result = await apply_links(kv, edited)
    assert (result.created, result.updated, result.unchanged) == ([], [ids[0]], ids[1:])
    stored = await _stored(js)
    assert stored[ids[0]] == changed
    assert stored[ids[0]].max_lot == 0.25

    # Without prune, links missing from the file stay.
    kept = edited[:3]
    result = await apply_links(kv, kept)
    assert result.removed == []
    assert set(await _stored(js)) == set(ids)

    result = await apply_links(kv, kept, prune=True)
    assert (result.created, result.updated) == ([], [])
    assert result.unchanged == ids[:3]
    assert sorted(result.removed) == sorted(ids[3:])
    assert await _stored(js) == {link.link_id: link for link in kept}

    # A pruned link comes back as created.
    result = await apply_links(kv, [*kept, links[3]])
    assert result.created == [ids[3]]
    assert result.unchanged == ids[:3]


async def test_prune_to_nothing_and_prune_an_empty_bucket(js: JetStreamContext) -> None:
    kv = (await ensure_buckets(js))[subjects.KV_LINKS]
    empty = await apply_links(kv, [], prune=True)
    assert (empty.created, empty.updated, empty.unchanged, empty.removed) == ([], [], [], [])

    links = load_links(EXAMPLE)[:2]
    await apply_links(kv, links)
    result = await apply_links(kv, [], prune=True)
    assert sorted(result.removed) == sorted(link.link_id for link in links)
    assert await _stored(js) == {}
    again = await apply_links(kv, [], prune=True)
    assert again.removed == []


async def test_applied_values_decode_back_to_the_same_link(js: JetStreamContext) -> None:
    kv = (await ensure_buckets(js))[subjects.KV_LINKS]
    links = load_links(EXAMPLE)
    await apply_links(kv, links)
    for link in links:
        entry = await kv.get(link.link_id)
        assert entry.value == codec.encode(link)
        decoded = codec.copy_link_decoder.decode(entry.value)
        assert decoded == link
        assert type(decoded.sizing) is type(link.sizing)
