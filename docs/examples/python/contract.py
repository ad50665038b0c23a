"""The tradecopy wire contract with generic tools only: msgpack maps, JSON Schema, streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators

PREFIX = "tc.v1"
SCHEMA_DIR = Path(__file__).resolve().parents[3] / "schemas" / "json"

#: Streams holding contract messages (KV buckets are streams ``KV_<bucket>``), in audit order.
CONTRACT_STREAMS = (
    "TC_MASTER_EVENTS",
    "TC_FOLLOWER_ORDERS",
    "TC_EXECUTION_REPORTS",
    "TC_DECISIONS",
    "TC_REJECTIONS",
    "KV_tc_accounts",
    "KV_tc_symbols",
    "KV_tc_links",
    "KV_tc_control",
    "KV_tc_fx",
)

_FAMILIES = {
    "TC_MASTER_EVENTS": "master_event",
    "TC_EXECUTION_REPORTS": "execution_report",
    "TC_DECISIONS": "copy_decision",
    "TC_REJECTIONS": "master_event_rejected",
    "KV_tc_accounts": "account_state",
    "KV_tc_symbols": "symbol_spec",
    "KV_tc_links": "copy_link",
    "KV_tc_control": "emergency_stop",
    "KV_tc_fx": "fx_rate",
}


def family_of(stream: str, subject: str) -> str | None:
    """The schema (file stem) of a message stored in ``stream`` under ``subject``."""
    if stream == "TC_FOLLOWER_ORDERS":
        batch = subject.startswith(f"{PREFIX}.connector.")
        return "follower_order_batch" if batch else "follower_order"
    return _FAMILIES.get(stream)


_DRAFT_ONE_OF = Draft202012Validator.VALIDATORS["oneOf"]


def one_of_by_discriminator(
    validator: Any, one_of: list[Any], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """``oneOf`` that honours ``discriminator`` as ajv does: only the tagged variant counts.

    jsonschema does not know the keyword; without this a union member missing one field gets
    one opaque "is not valid under any of the given schemas" error. Each variant holds its tag
    as a ``const``: the variant whose ``const`` did not fail is the one the tag names.
    """
    discriminator = schema.get("discriminator")
    if discriminator is None or not validator.is_type(instance, "object"):
        yield from _DRAFT_ONE_OF(validator, one_of, instance, schema)
        return
    tag = discriminator["propertyName"]
    if tag not in instance:
        yield ValidationError(f"{tag!r} is a required property (the message's tag)")
        return
    for index, variant in enumerate(one_of):
        errors = list(validator.descend(instance, variant, schema_path=index))
        if not any(e.validator == "const" and list(e.path) == [tag] for e in errors):
            yield from errors
            return
    yield ValidationError(f"{instance[tag]!r} is not a known {tag!r} of this message")


#: Draft 2020-12 with the discriminator recipe above.
ContractValidator = validators.extend(Draft202012Validator, {"oneOf": one_of_by_discriminator})


def load_validators(directory: Path = SCHEMA_DIR) -> dict[str, Any]:
    """File stem → validator, for every schema of ``directory`` (each checked first)."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        schema = json.loads(path.read_text())
        ContractValidator.check_schema(schema)
        out[path.stem] = ContractValidator(schema)
    return out


class Tally:
    """Counts of what a client validated, and the first problems it saw."""

    def __init__(self, validators: dict[str, Any]) -> None:
        self.validators = validators
        self.validated = 0
        self.invalid = 0
        self.by_family: dict[str, int] = {}
        self.problems: list[str] = []

    def check(self, family: str, message: Any, where: str) -> bool:
        errors = list(self.validators[family].iter_errors(message))
        self.validated += 1
        self.by_family[family] = self.by_family.get(family, 0) + 1
        if errors:
            self.invalid += 1
            if len(self.problems) < 20:
                said = "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
                self.problems.append(f"{where} ({family}): {said}")
        return not errors
