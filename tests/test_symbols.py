"""Symbol mapping: explicit pairs, prefix/suffix rules, case preserved; include/exclude lists."""

from __future__ import annotations

import pytest

from engine.replicator.symbols import map_symbol, symbol_allowed
from schemas.links import SymbolMapping


def test_no_rules_leaves_symbol_unchanged() -> None:
    assert map_symbol(SymbolMapping(), "EURUSD") == "EURUSD"
    assert map_symbol(SymbolMapping(), "usdjpy.") == "usdjpy."


def test_explicit_pair_wins_over_prefix_and_suffix_rules() -> None:
    mapping = SymbolMapping(
        pairs={"GOLD": "XAUUSD.pro"}, strip_suffix=".", add_prefix="x", add_suffix=".m"
    )
    assert map_symbol(mapping, "GOLD") == "XAUUSD.pro"
    # Symbols without a pair still go through the rules.
    assert map_symbol(mapping, "EURUSD.") == "xEURUSD.m"


def test_strip_suffix_then_add_suffix_keeps_lower_case() -> None:
    mapping = SymbolMapping(strip_suffix=".", add_suffix=".m")
    assert map_symbol(mapping, "usdjpy.") == "usdjpy.m"


def test_strip_suffix_only_when_present() -> None:
    mapping = SymbolMapping(strip_suffix=".", add_suffix=".m")
    assert map_symbol(mapping, "usdjpy") == "usdjpy.m"


def test_strip_prefix() -> None:
    mapping = SymbolMapping(strip_prefix="#")
    assert map_symbol(mapping, "#US30") == "US30"
    assert map_symbol(mapping, "US30") == "US30"


def test_strip_prefix_is_case_insensitive_and_keeps_rest_of_case() -> None:
    mapping = SymbolMapping(strip_prefix="m_", add_prefix="FX:")
    assert map_symbol(mapping, "M_EurUsd") == "FX:EurUsd"


def test_strip_suffix_is_case_insensitive() -> None:
    mapping = SymbolMapping(strip_suffix="-ecn", add_suffix="_raw")
    assert map_symbol(mapping, "GBPUSD-ECN") == "GBPUSD_raw"


def test_case_preserved_with_added_suffix() -> None:
    assert map_symbol(SymbolMapping(add_suffix="-ECN"), "XAUUSD") == "XAUUSD-ECN"
    assert map_symbol(SymbolMapping(add_suffix="-ECN"), "xauusd") == "xauusd-ECN"


def test_strip_both_prefix_and_suffix_and_add_both() -> None:
    mapping = SymbolMapping(strip_prefix="a.", strip_suffix=".b", add_prefix="c_", add_suffix="_d")
    assert map_symbol(mapping, "a.EURUSD.b") == "c_EURUSD_d"


@pytest.mark.parametrize(
    ("include", "exclude", "symbol", "expected"),
    [
        (frozenset(), frozenset(), "EURUSD", (True, "")),
        (frozenset({"EURUSD"}), frozenset(), "eurusd", (True, "")),
        (frozenset({"EURUSD"}), frozenset(), "GBPUSD", (False, "symbol_not_included")),
        (frozenset(), frozenset({"XAUUSD"}), "xauUSD", (False, "symbol_excluded")),
        (frozenset(), frozenset({"XAUUSD"}), "EURUSD", (True, "")),
    ],
)
def test_symbol_allowed_include_exclude_case_insensitive(
    include: frozenset[str], exclude: frozenset[str], symbol: str, expected: tuple[bool, str]
) -> None:
    assert symbol_allowed(include, exclude, symbol) == expected
