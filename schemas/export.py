"""JSON Schema export of every wire message to ``schemas/json/``, strict-validator clean."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from schemas import WIRE_VERSION
from schemas.account import AccountState, FxRate, SymbolSpec
from schemas.bridge import ConnectorFrame, TerminalFrame
from schemas.control import EmergencyStop
from schemas.decisions import CopyDecision
from schemas.links import CopyLink
from schemas.market import Quote
from schemas.master import MasterEvent
from schemas.orders import FollowerOrder, FollowerOrderBatch
from schemas.rejections import MasterEventRejected
from schemas.reports import ExecutionReport
from schemas.signals import StrategyDeployment, StrategyRunFailed, StrategySignal

JSON_DIR = Path(__file__).parent / "json"

#: file stem → message type. One file per message family.
MESSAGES: dict[str, Any] = {
    "master_event": MasterEvent,
    "follower_order": FollowerOrder,
    "follower_order_batch": FollowerOrderBatch,
    "execution_report": ExecutionReport,
    "copy_decision": CopyDecision,
    "master_event_rejected": MasterEventRejected,
    "account_state": AccountState,
    "symbol_spec": SymbolSpec,
    "fx_rate": FxRate,
    "quote": Quote,
    "emergency_stop": EmergencyStop,
    "copy_link": CopyLink,
    "bridge_terminal_frame": TerminalFrame,
    "bridge_connector_frame": ConnectorFrame,
    "strategy_signal": StrategySignal,
    "strategy_run_failed": StrategyRunFailed,
    "strategy_deployment": StrategyDeployment,
}

#: Families carried as JSON (the terminal bridge over ZeroMQ, the strategy deployments' KV
#: values); every other one is msgpack.
JSON_WIRE = frozenset({"bridge_terminal_frame", "bridge_connector_frame", "strategy_deployment"})

#: The description of every integer field says how it travels (wire → note).
INT64_NOTE = {
    "msgpack": "int64 on the wire: a msgpack integer, never a float (a float is refused).",
    "json": "int64 on the wire: a JSON integer, without fraction or exponent.",
}
#: The note of a UTC-nanosecond field (``*_ns``): its values are above 2^53.
NS_NOTE = (
    "UTC nanoseconds, int64 on the wire: a msgpack integer, never a float. Above 2^53, so "
    "decode it as a 64-bit integer (JavaScript: BigInt, @msgpack/msgpack `useBigInt64: true`); "
    "a float64 cannot hold it exactly and is refused."
)
#: The same for a family carried as JSON.
JSON_NS_NOTE = (
    "UTC nanoseconds, int64 on the wire: a JSON integer, without fraction or exponent. Above "
    "2^53, so parse it as a 64-bit integer (JavaScript: BigInt, e.g. JSON.parse with a reviver "
    "reading the source text); a float64 cannot hold it exactly and is refused."
)


# Keywords whose value is a map of name → subschema, a list of subschemas, or one subschema.
# Everything else (default, enum, const, examples, required, ...) is data or a plain value,
# left as it is even where it holds a key called "description".
_SCHEMA_MAPS = frozenset(
    {"$defs", "definitions", "properties", "patternProperties", "dependentSchemas"}
)
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_VALUES = frozenset(
    {
        "additionalProperties",
        "contains",
        "else",
        "if",
        "items",
        "not",
        "propertyNames",
        "then",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)


def clean_description(text: str) -> str:
    """``text`` with common indentation, blank edge lines and trailing spaces removed.

    Descriptions come from docstrings, whose indentation depends on where they were rendered:
    msgspec before 0.23 and Python up to 3.12 keep it, msgspec 0.23 and Python 3.13 (at compile
    time) strip it, each with its own rules for blank and whitespace-only lines. Cleaning every
    description the same way makes the exported files independent of both.
    """
    return "\n".join(line.rstrip() for line in inspect.cleandoc(text).split("\n"))


def _null_last(options: list[Any]) -> list[Any]:
    # msgspec before 0.22 lists None where the union declares it, later ones always last; the
    # order of anyOf carries no meaning, so the later rule is applied to every rendering.
    def is_null(option: Any) -> bool:
        return isinstance(option, dict) and option.get("type") == "null"

    return [o for o in options if not is_null(o)] + [o for o in options if is_null(o)]


def normalize_schema(schema: Any) -> Any:
    """A copy of a JSON Schema that renders the same whatever msgspec or Python produced it.

    Every ``description`` goes through `clean_description` and every ``anyOf`` lists its
    ``null`` option last. Only subschemas are visited: values that are data (``default``,
    ``enum``, ``examples``, ...) and property names are kept as they are.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            out[key] = clean_description(value)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: normalize_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            subs = [normalize_schema(sub) for sub in value]
            out[key] = _null_last(subs) if key == "anyOf" else subs
        elif key in _SCHEMA_VALUES:
            out[key] = normalize_schema(value)
        else:
            out[key] = value
    return out


def _map_subschemas(schema: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of ``schema`` with ``fn`` applied to each direct subschema (data left alone)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: fn(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [fn(sub) for sub in value]
        elif key in _SCHEMA_VALUES:
            out[key] = fn(value)
        else:
            out[key] = value
    return out


def _is_integer(schema: Any) -> bool:
    """An integer, a nullable integer, or an array of integers."""
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "integer":
        return True
    if schema.get("type") == "array":
        return _is_integer(schema.get("items"))
    return any(_is_integer(option) for option in schema.get("anyOf", ()))


def _document_integers(schema: Any, wire: str) -> Any:
    """Every integer property says "int64 on the wire" (and, for ``*_ns``, how to read it)."""
    if not isinstance(schema, dict):
        return schema
    out = _map_subschemas(schema, lambda sub: _document_integers(sub, wire))
    for name, prop in out.get("properties", {}).items():
        if _is_integer(prop):
            if name.endswith("_ns"):
                note = NS_NOTE if wire == "msgpack" else JSON_NS_NOTE
            else:
                note = INT64_NOTE[wire]
            text = prop.get("description")
            prop["description"] = f"{text}\n\n{note}" if text else note
    return out


def _tagged_unions(schema: Any, variants: dict[str, str]) -> Any:
    """msgspec's ``anyOf`` + ``discriminator.mapping`` as ``oneOf`` + ``discriminator``.

    Records in ``variants`` each referenced variant's ``$defs`` name and its tag property,
    for `strict_schema` to turn the tag into a ``const``.
    """
    if not isinstance(schema, dict):
        return schema
    out = _map_subschemas(schema, lambda sub: _tagged_unions(sub, variants))
    discriminator = out.get("discriminator")
    if isinstance(discriminator, dict) and "anyOf" in out:
        tag = discriminator["propertyName"]
        for option in out["anyOf"]:
            variants[option["$ref"].removeprefix("#/$defs/")] = tag
        out["oneOf"] = out.pop("anyOf")
        out["discriminator"] = {"propertyName": tag}
        out["type"] = "object"
    return out


def strict_schema(schema: dict[str, Any], wire: str = "msgpack") -> dict[str, Any]:
    """``schema`` in the shape strict validators compile (ajv strict mode, Draft 2020-12).

    Tagged unions become ``oneOf`` of references to variants that each hold the tag as a
    ``const`` in ``properties`` and in ``required``, with ``discriminator: {propertyName}``
    (no ``mapping``) and ``type: object`` beside it: what ajv's ``discriminator: true``
    accepts. A validator that knows the keyword checks only the variant the tag names, so a
    message missing one field gets one error, not one per variant. Every integer property
    says that it is int64 on the wire.
    """
    variants: dict[str, str] = {}
    out = _tagged_unions(_document_integers(schema, wire), variants)
    defs = out.get("$defs", {})
    for name, tag in variants.items():
        variant = defs[name]
        values = variant["properties"][tag].pop("enum", None)
        if values is not None:
            variant["properties"][tag]["const"] = values[0]
        if tag not in variant.get("required", ()):
            raise ValueError(f"variant {name}: its tag {tag!r} must be required")
    return out


def render_schema(stem: str, tp: Any) -> str:
    """The JSON text exported for one message type: sorted keys, trailing newline."""
    wire = "json" if stem in JSON_WIRE else "msgpack"
    schema = strict_schema(normalize_schema(msgspec.json.schema(tp)), wire)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"tradecopy/v{WIRE_VERSION}/{stem}.json",
        "title": stem,
        **schema,
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def render_schemas() -> dict[str, str]:
    """File name → JSON text, deterministic across msgspec and Python versions."""
    return {f"{stem}.json": render_schema(stem, tp) for stem, tp in MESSAGES.items()}


def export_schemas(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale_schemas(directory: Path = JSON_DIR) -> list[str]:
    """Names of files in ``directory`` that differ from what the code would export."""
    stale = []
    for name, text in render_schemas().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale
