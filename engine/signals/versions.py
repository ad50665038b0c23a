"""Strategy versions: immutable code and parameters, named by their hashes."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import msgspec

from engine.core.strategy_versions import (
    ENTRY_POINT,
    MAX_PARAMETERS,
    MAX_SOURCE_BYTES,
    MAX_TEXT_PARAMETER,
    PARAMS_CLASS,
    check_source,
    make_version,
    scalar_parameters,
    source_sha256,
    uploaded_version,
    verify_id,
    verify_uploaded,
    version_id_of,
)
from engine.signals.errors import StrategyVersionError
from engine.signals.strategies import rsi, sma_cross
from engine.signals.strategy import Candles, Signal
from schemas.signals import Author, Parameters, ParameterValue, StrategyVersion, VersionId

# The upload checks live in engine.core.strategy_versions (the API accepts uploads without
# importing this service); these names keep their old import path.
__all__ = [
    "ENTRY_POINT",
    "MAX_PARAMETERS",
    "MAX_SOURCE_BYTES",
    "MAX_TEXT_PARAMETER",
    "PARAMS_CLASS",
    "SHIPPED",
    "Author",
    "ParameterValue",
    "Parameters",
    "ShippedStrategy",
    "StrategyVersion",
    "VersionId",
    "bind_shipped",
    "check_source",
    "code_sha256",
    "new_version",
    "shipped_parameters",
    "verify",
    "version_id_of",
]


class ShippedStrategy(msgspec.Struct, frozen=True, kw_only=True):
    """A strategy that ships with the platform: its function, parameter type and module."""

    run: Callable[..., Signal]
    params: type[msgspec.Struct]
    module: ModuleType


SHIPPED: Mapping[str, ShippedStrategy] = {
    "sma_cross": ShippedStrategy(
        run=sma_cross.sma_cross, params=sma_cross.SmaCrossParams, module=sma_cross
    ),
    "rsi_reversal": ShippedStrategy(run=rsi.rsi_reversal, params=rsi.RsiParams, module=rsi),
}


def code_sha256(*, source: str | None = None, shipped: str | None = None) -> str:
    """sha256 of what runs: an upload's text, or a shipped strategy's name and module text
    (a changed shipped strategy is a new version, never the old one under the same id)."""
    if (source is None) == (shipped is None):
        raise StrategyVersionError("a strategy is either uploaded source or a shipped name")
    if shipped is None:
        assert source is not None
        return source_sha256(source)
    text = f"shipped:{shipped}\n{inspect.getsource(_shipped(shipped).module)}"
    return hashlib.sha256(text.encode()).hexdigest()


def new_version(
    *,
    parameters: Mapping[str, Any],
    author: str,
    created_ns: int,
    source: str | None = None,
    shipped: str | None = None,
) -> StrategyVersion:
    """Validate an upload and return its version (pure: the source is parsed, never run).

    A shipped strategy's parameters are checked by its parameter type and stored complete
    (defaults filled in), so ``{}`` and ``{"fast": 10}`` are the same SMA-cross version.
    Uploaded sources must define ``strategy(candles, params)`` at module level; their
    parameters are checked as JSON scalars here and by the module's ``Params`` in the sandbox.
    """
    if shipped is None:
        if source is None:
            raise StrategyVersionError("a strategy is either uploaded source or a shipped name")
        return uploaded_version(
            source=source, parameters=parameters, author=author, created_ns=created_ns
        )
    if source is not None:
        raise StrategyVersionError("a strategy is either uploaded source or a shipped name")
    params = shipped_parameters(shipped, parameters)
    return make_version(
        code_hash=code_sha256(shipped=shipped),
        parameters=params,
        author=author,
        created_ns=created_ns,
        shipped=shipped,
    )


def verify(version: StrategyVersion) -> StrategyVersion:
    """The version itself if its hashes match its code and parameters; a stored or
    configured version that was edited after upload is refused, never run under its id."""
    if version.shipped is None:
        return verify_uploaded(version)
    if code_sha256(shipped=version.shipped) != version.code_sha256:
        raise StrategyVersionError(f"{version.version_id}: code does not match its sha256")
    return verify_id(version)


def shipped_parameters(name: str, parameters: Mapping[str, Any]) -> Parameters:
    """A shipped strategy's parameters, validated by its type and complete."""
    strategy = _shipped(name)
    try:
        bound = msgspec.convert(dict(parameters), strategy.params)
    except (msgspec.ValidationError, ValueError) as exc:
        raise StrategyVersionError(f"{name} parameters: {exc}") from None
    return scalar_parameters(msgspec.to_builtins(bound))


def bind_shipped(name: str, parameters: Mapping[str, Any]) -> Callable[[Candles], Signal]:
    """The shipped strategy as a one-argument function of the candles."""
    strategy = _shipped(name)
    bound = msgspec.convert(dict(parameters), strategy.params)
    return lambda candles: strategy.run(candles, bound)


def _shipped(name: str) -> ShippedStrategy:
    try:
        return SHIPPED[name]
    except KeyError:
        known = ", ".join(sorted(SHIPPED))
        raise StrategyVersionError(f"shipped: unknown strategy {name!r} (known: {known})") from None
