"""Symbol rules: include/exclude lists and master → follower symbol mapping."""

from __future__ import annotations

from schemas.decisions import DecisionRule
from schemas.links import SymbolMapping


def map_symbol(mapping: SymbolMapping, master_symbol: str) -> str:
    """The follower's name for ``master_symbol``; case is preserved as configured.

    An explicit pair wins. Otherwise the master's broker prefix/suffix are stripped (when
    present, compared case-insensitively) and the follower's are added.
    """
    explicit = mapping.pairs.get(master_symbol)
    if explicit is not None:
        return explicit
    core = master_symbol
    if mapping.strip_prefix and core.lower().startswith(mapping.strip_prefix.lower()):
        core = core[len(mapping.strip_prefix) :]
    if mapping.strip_suffix and core.lower().endswith(mapping.strip_suffix.lower()):
        core = core[: len(core) - len(mapping.strip_suffix)]
    return f"{mapping.add_prefix}{core}{mapping.add_suffix}"


def symbol_allowed(
    include: frozenset[str], exclude: frozenset[str], master_symbol: str
) -> tuple[bool, DecisionRule | str]:
    """``(allowed, rule)``, rule empty when allowed; include/exclude hold upper-cased names."""
    name = master_symbol.upper()
    if include and name not in include:
        return False, DecisionRule.SYMBOL_NOT_INCLUDED
    if name in exclude:
        return False, DecisionRule.SYMBOL_EXCLUDED
    return True, ""
