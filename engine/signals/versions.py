"""Strategy versions: immutable code and parameters, named by their hashes."""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Annotated, Any

import msgspec

from engine.signals.errors import StrategyVersionError
from engine.signals.strategies import rsi, sma_cross
from engine.signals.strategy import Candles, Signal

#: A parameter value: a JSON scalar, so the version id has one canonical spelling.
ParameterValue = str | int | float | bool | None
Parameters = dict[str, ParameterValue]

#: Uploaded sources larger than this are refused: a strategy is a function, not a data set.
MAX_SOURCE_BYTES = 256 * 1024
MAX_PARAMETERS = 64
MAX_TEXT_PARAMETER = 256
#: The function an uploaded module must define: ``strategy(candles, params) -> Signal``.
ENTRY_POINT = "strategy"
#: An uploaded module may define this msgspec Struct; its parameters are converted into it.
PARAMS_CLASS = "Params"

_PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_VERSION_ID = re.compile(r"^sv-[0-9a-f]{24}$")

VersionId = Annotated[str, msgspec.Meta(pattern=_VERSION_ID.pattern)]
Author = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


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


class StrategyVersion(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One immutable version of a strategy: exactly one of ``shipped`` (a name in
    :data:`SHIPPED`) or ``source`` (an uploaded module's text), its parameters, who uploaded
    it and when. ``version_id`` derives from ``code_sha256`` and the parameters, so the same
    code with the same parameters is the same version whoever uploads it again."""

    version_id: VersionId
    code_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    parameters: Parameters
    author: Author
    created_ns: Annotated[int, msgspec.Meta(ge=0)]
    shipped: str | None = None
    source: str = ""


def code_sha256(*, source: str | None = None, shipped: str | None = None) -> str:
    """sha256 of what runs: an upload's text, or a shipped strategy's name and module text
    (a changed shipped strategy is a new version, never the old one under the same id)."""
    if (source is None) == (shipped is None):
        raise StrategyVersionError("a strategy is either uploaded source or a shipped name")
    if shipped is not None:
        text = f"shipped:{shipped}\n{inspect.getsource(_shipped(shipped).module)}"
    else:
        assert source is not None
        text = source
    return hashlib.sha256(text.encode()).hexdigest()


def version_id_of(code_hash: str, parameters: Parameters) -> str:
    """``sv-`` and 24 hex digits of sha256(code hash, parameters as sorted JSON)."""
    canonical = msgspec.json.encode(parameters, order="sorted")
    digest = hashlib.sha256(code_hash.encode() + b"\n" + canonical).hexdigest()
    return f"sv-{digest[:24]}"


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
    if shipped is not None:
        params = shipped_parameters(shipped, parameters)
    else:
        if source is None:
            raise StrategyVersionError("a strategy is either uploaded source or a shipped name")
        check_source(source)
        params = _scalar_parameters(parameters)
    code_hash = code_sha256(source=source, shipped=shipped)
    try:
        return msgspec.convert(
            {
                "version_id": version_id_of(code_hash, params),
                "code_sha256": code_hash,
                "parameters": params,
                "author": author,
                "created_ns": created_ns,
                "shipped": shipped,
                "source": source or "",
            },
            StrategyVersion,
        )
    except msgspec.ValidationError as exc:
        raise StrategyVersionError(str(exc)) from None


def verify(version: StrategyVersion) -> StrategyVersion:
    """The version itself if its hashes match its code and parameters; a stored or
    configured version that was edited after upload is refused, never run under its id."""
    code_hash = code_sha256(
        source=None if version.shipped is not None else version.source, shipped=version.shipped
    )
    if code_hash != version.code_sha256:
        raise StrategyVersionError(f"{version.version_id}: code does not match its sha256")
    if version_id_of(code_hash, version.parameters) != version.version_id:
        raise StrategyVersionError(f"{version.version_id}: id does not match code and parameters")
    return version


def shipped_parameters(name: str, parameters: Mapping[str, Any]) -> Parameters:
    """A shipped strategy's parameters, validated by its type and complete."""
    strategy = _shipped(name)
    try:
        bound = msgspec.convert(dict(parameters), strategy.params)
    except (msgspec.ValidationError, ValueError) as exc:
        raise StrategyVersionError(f"{name} parameters: {exc}") from None
    return _scalar_parameters(msgspec.to_builtins(bound))


def bind_shipped(name: str, parameters: Mapping[str, Any]) -> Callable[[Candles], Signal]:
    """The shipped strategy as a one-argument function of the candles."""
    strategy = _shipped(name)
    bound = msgspec.convert(dict(parameters), strategy.params)
    return lambda candles: strategy.run(candles, bound)


def check_source(source: str) -> None:
    """Refuse an upload that cannot run: too large, not Python, or without ``strategy``."""
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise StrategyVersionError(f"source: larger than {MAX_SOURCE_BYTES} bytes")
    try:
        tree = ast.parse(source, filename="<strategy>")
    except (SyntaxError, ValueError) as exc:
        raise StrategyVersionError(f"source: not valid Python: {exc}") from None
    defined = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    if ENTRY_POINT not in defined:
        raise StrategyVersionError(
            f"source: define `def {ENTRY_POINT}(candles, params)` at module level"
        )


def _scalar_parameters(parameters: Mapping[str, Any]) -> Parameters:
    if len(parameters) > MAX_PARAMETERS:
        raise StrategyVersionError(f"parameters: at most {MAX_PARAMETERS}")
    out: Parameters = {}
    for name, value in parameters.items():
        if not isinstance(name, str) or not _PARAMETER_NAME.match(name):
            raise StrategyVersionError(f"parameters: {name!r} is not a parameter name")
        if isinstance(value, float) and not math.isfinite(value):
            raise StrategyVersionError(f"parameters.{name}: not a finite number")
        if isinstance(value, str) and len(value) > MAX_TEXT_PARAMETER:
            raise StrategyVersionError(f"parameters.{name}: longer than {MAX_TEXT_PARAMETER}")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise StrategyVersionError(
                f"parameters.{name}: a string, number, boolean or null, not {type(value).__name__}"
            )
        out[name] = value
    return out


def _shipped(name: str) -> ShippedStrategy:
    try:
        return SHIPPED[name]
    except KeyError:
        known = ", ".join(sorted(SHIPPED))
        raise StrategyVersionError(f"shipped: unknown strategy {name!r} (known: {known})") from None
