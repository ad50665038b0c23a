"""Strategy versions from uploaded sources: ids, hashes and checks, with no strategy run.

The server-free part of ``engine.signals.versions`` that accepts uploads: the API builds a
version from a provider's source text here, and the signal workers use the same functions,
so an upload gets the same ``version_id`` wherever it is made. The source is parsed with
``ast``, never imported or run (the sandbox runs it). Shipped strategies hash their module's
text, which only the signals service has; ``engine.signals.versions`` handles them.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from engine.core.errors import StrategyVersionError
from schemas.signals import VERSION_ID_PATTERN, Parameters, StrategyVersion

#: Uploaded sources larger than this are refused: a strategy is a function, not a data set.
MAX_SOURCE_BYTES = 256 * 1024
MAX_PARAMETERS = 64
MAX_TEXT_PARAMETER = 256
#: The function an uploaded module must define: ``strategy(candles, params) -> Signal``.
ENTRY_POINT = "strategy"
#: An uploaded module may define this msgspec Struct; its parameters are converted into it.
PARAMS_CLASS = "Params"

_PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_VERSION_ID = re.compile(VERSION_ID_PATTERN)


def source_sha256(source: str) -> str:
    """sha256 of an uploaded module's text: what runs."""
    return hashlib.sha256(source.encode()).hexdigest()


def version_id_of(code_hash: str, parameters: Parameters) -> str:
    """``sv-`` and 24 hex digits of sha256(code hash, parameters as sorted JSON)."""
    canonical = msgspec.json.encode(parameters, order="sorted")
    digest = hashlib.sha256(code_hash.encode() + b"\n" + canonical).hexdigest()
    return f"sv-{digest[:24]}"


def is_version_id(text: str) -> bool:
    return _VERSION_ID.match(text) is not None


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


def scalar_parameters(parameters: Mapping[str, Any]) -> Parameters:
    """The parameters as JSON scalars under valid names, or the first one that is not."""
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


def make_version(
    *,
    code_hash: str,
    parameters: Parameters,
    author: str,
    created_ns: int,
    shipped: str | None = None,
    source: str = "",
) -> StrategyVersion:
    """The version of checked code and parameters, its fields validated by the contract."""
    try:
        return msgspec.convert(
            {
                "version_id": version_id_of(code_hash, parameters),
                "code_sha256": code_hash,
                "parameters": parameters,
                "author": author,
                "created_ns": created_ns,
                "shipped": shipped,
                "source": source,
            },
            StrategyVersion,
        )
    except msgspec.ValidationError as exc:
        raise StrategyVersionError(str(exc)) from None


def uploaded_version(
    *, source: str, parameters: Mapping[str, Any], author: str, created_ns: int
) -> StrategyVersion:
    """Validate an uploaded module and its parameters and return its version.

    Pure: the source is parsed, never run. It must define ``strategy(candles, params)`` at
    module level; the parameters are checked as JSON scalars here and by the module's
    ``Params`` in the sandbox.
    """
    check_source(source)
    params = scalar_parameters(parameters)
    return make_version(
        code_hash=source_sha256(source),
        parameters=params,
        author=author,
        created_ns=created_ns,
        source=source,
    )


def verify_id(version: StrategyVersion) -> StrategyVersion:
    """The version itself if its id derives from its code hash and parameters."""
    if version_id_of(version.code_sha256, version.parameters) != version.version_id:
        raise StrategyVersionError(f"{version.version_id}: id does not match code and parameters")
    return version


def verify_uploaded(version: StrategyVersion) -> StrategyVersion:
    """The uploaded version itself if its hashes match its source and parameters.

    A stored version edited after upload is refused, never run under its id. A shipped
    version is refused here: its hash covers module text only the signals service has
    (``engine.signals.versions.verify`` checks both kinds).
    """
    if version.shipped is not None:
        raise StrategyVersionError(
            f"{version.version_id}: a shipped strategy's version is verified by the signals "
            "service, not from its upload"
        )
    if source_sha256(version.source) != version.code_sha256:
        raise StrategyVersionError(f"{version.version_id}: code does not match its sha256")
    return verify_id(version)
