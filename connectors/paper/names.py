"""Broker symbol names: suffixes (``usdjpy.``, ``EURUSD.m``, ``XAUUSD-ecn``) and aliases."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import msgspec


class SymbolNames(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a broker's symbol name finds the venue's symbol.

    Matching ignores case. A name is tried as it is, then without the first suffix of
    ``suffixes`` it ends with, each then through ``aliases`` (broker name → venue symbol):
    ``usdjpy.`` → ``USDJPY``, ``GOLD.m`` → ``XAUUSD`` with ``{"GOLD": "XAUUSD"}``.
    """

    aliases: dict[str, str] = {}
    suffixes: list[str] = []

    def resolve(self, name: str, symbols: Collection[str]) -> str | None:
        """The venue symbol ``name`` means, or None when it means none of ``symbols``."""
        by_upper = {s.upper(): s for s in symbols}
        aliases = {k.upper(): v for k, v in self.aliases.items()}
        for candidate in self._candidates(name.strip()):
            found = _lookup(candidate.upper(), by_upper, aliases)
            if found is not None:
                return found
        return None

    def _candidates(self, name: str) -> list[str]:
        candidates = [name]
        lower = name.lower()
        for suffix in sorted(self.suffixes, key=len, reverse=True):
            if suffix and lower.endswith(suffix.lower()) and len(name) > len(suffix):
                candidates.append(name[: -len(suffix)])
                break
        return candidates


def _lookup(upper: str, by_upper: Mapping[str, str], aliases: Mapping[str, str]) -> str | None:
    if upper in by_upper:
        return by_upper[upper]
    target = aliases.get(upper)
    if target is not None:
        return by_upper.get(target.upper())
    return None
