"""Declarative link files: load ``links.toml``, validate every field, apply to the KV bucket."""

from __future__ import annotations

import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from engine.core.errors import LinkFileError
from engine.runtime.jetstream import live_keys
from schemas import codec, subjects
from schemas.links import CopyLink, TradingHours, link_problems, trading_hours_problems


@dataclass(frozen=True, slots=True)
class LinkError:
    """One invalid field of one link, located so a person can fix it."""

    where: str
    """``links[2] (gold-x2).sizing.factor``."""
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _split_path(message: str) -> tuple[str, str]:
    """msgspec says ``Expected int - at `$.factor```; return ('.factor', 'Expected int')."""
    head, sep, tail = message.rpartition(" - at `$")
    if not sep:
        return "", message
    return tail.rstrip("`"), head


def _struct_variants(tp: Any) -> list[type[msgspec.Struct]]:
    """The Struct types a field may hold (through ``X | None`` and tagged unions)."""
    unions = (typing.Union, types.UnionType)
    args = typing.get_args(tp) if typing.get_origin(tp) in unions else (tp,)
    return [a for a in args if isinstance(a, type) and issubclass(a, msgspec.Struct)]


def _check_struct(raw: dict[str, Any], tp: type[msgspec.Struct], where: str) -> list[LinkError]:
    """Every invalid field of ``raw`` as a ``tp``, recursing into nested tables."""
    errors: list[LinkError] = []
    tag_field = tp.__struct_config__.tag_field
    fields = {f.name: f for f in msgspec.structs.fields(tp)}
    for name in raw:
        if name not in fields and name != tag_field:
            errors.append(LinkError(f"{where}.{name}", "unknown field"))
    for name, info in fields.items():
        if name not in raw:
            if info.required:
                errors.append(LinkError(f"{where}.{name}", "required field is missing"))
            continue
        errors.extend(_check_value(raw[name], info.type, f"{where}.{name}"))
    problems: list[tuple[str, str]] = []
    if tp is TradingHours:
        problems = trading_hours_problems(
            raw.get("start"), raw.get("end"), raw.get("timezone", "Europe/Berlin")
        )
    elif tp is CopyLink:
        problems = link_problems(
            raw.get("master"),
            raw.get("follower"),
            raw.get("symbols_include", []),
            raw.get("symbols_exclude", []),
        )
    reported = {e.where for e in errors}
    for field, message in problems:
        if f"{where}.{field}" not in reported:
            errors.append(LinkError(f"{where}.{field}", message))
    return errors


def _check_value(value: Any, tp: Any, where: str) -> list[LinkError]:
    variants = _struct_variants(tp)
    if variants and isinstance(value, dict):
        tagged = [v for v in variants if v.__struct_config__.tag_field is not None]
        if tagged:
            tag_field = tagged[0].__struct_config__.tag_field
            tags = {v.__struct_config__.tag: v for v in tagged}
            tag = value.get(tag_field)
            if tag not in tags:
                expected = ", ".join(sorted(str(t) for t in tags))
                return [
                    LinkError(f"{where}.{tag_field}", f"must be one of {expected}, got {tag!r}")
                ]
            return _check_struct(value, tags[tag], where)
        return _check_struct(value, variants[0], where)
    try:
        msgspec.convert(value, tp)
    except (msgspec.ValidationError, ValueError) as exc:
        sub, message = _split_path(str(exc))
        return [LinkError(f"{where}{sub}", message)]
    return []


def validate_link(raw: Any, index: int = 0) -> tuple[CopyLink | None, list[LinkError]]:
    """Check every field of one raw link table and report each invalid one, not just the first."""
    label = f"links[{index}]"
    if not isinstance(raw, dict):
        return None, [LinkError(label, f"must be a table, got {type(raw).__name__}")]
    link_id = raw.get("link_id")
    if isinstance(link_id, str):
        label = f"{label} ({link_id})"
    errors = _check_struct(raw, CopyLink, label)
    if errors:
        return None, errors
    try:
        return msgspec.convert(raw, CopyLink), []
    except (msgspec.ValidationError, ValueError) as exc:  # a rule the checks above missed
        sub, message = _split_path(str(exc))
        return None, [LinkError(f"{label}{sub}", message)]


def load_links(path: Path) -> list[CopyLink]:
    """Parse and validate a link file; raise ``LinkFileError`` listing every problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise LinkFileError(str(path), [LinkError("file", f"not valid TOML: {exc}")]) from exc
    errors: list[LinkError] = []
    unknown = set(data) - {"links"}
    errors.extend(
        LinkError(key, "unknown top-level key (expected [[links]])") for key in sorted(unknown)
    )
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        errors.append(LinkError("links", "must be an array of tables ([[links]])"))
        raw_links = []
    links: list[CopyLink] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_links):
        link, link_errors = validate_link(raw, index)
        errors.extend(link_errors)
        if link is None:
            continue
        if link.link_id in seen:
            errors.append(
                LinkError(
                    f"links[{index}] ({link.link_id}).link_id",
                    f"duplicate of links[{seen[link.link_id]}]",
                )
            )
            continue
        seen[link.link_id] = index
        links.append(link)
    if errors:
        raise LinkFileError(str(path), errors)
    return links


@dataclass(frozen=True, slots=True)
class ApplyResult:
    created: list[str]
    updated: list[str]
    unchanged: list[str]
    removed: list[str]


async def apply_links(kv: KeyValue, links: list[CopyLink], prune: bool = False) -> ApplyResult:
    """Write links to the KV bucket; replicators pick the change up live, no restart."""
    created, updated, unchanged, removed = [], [], [], []
    wanted = {link.link_id for link in links}
    for link in links:
        payload = codec.encode(link)
        try:
            entry = await kv.get(link.link_id)
            current = entry.value
        except nats.js.errors.KeyNotFoundError:
            current = None
        if current == payload:
            unchanged.append(link.link_id)
            continue
        await kv.put(link.link_id, payload)
        (updated if current is not None else created).append(link.link_id)
    if prune:
        # (kv._js: the JetStream context the bucket was opened with)
        existing = await live_keys(kv._js, kv, subjects.KV_LINKS)
        for key in existing:
            if key not in wanted:
                await kv.delete(key)
                removed.append(key)
    return ApplyResult(created, updated, unchanged, removed)


def validate_link_fragment(raw: Any, allowed: frozenset[str]) -> list[LinkError]:
    """Every invalid field of a partial link (only the ``allowed`` fields of ``CopyLink``,
    each checked as the link itself checks it), located from the fragment's root."""
    if not isinstance(raw, dict):
        return [LinkError("", f"must be an object, got {type(raw).__name__}")]
    fields = {f.name: f for f in msgspec.structs.fields(CopyLink)}
    errors: list[LinkError] = []
    for name, value in raw.items():
        if name not in allowed:
            errors.append(LinkError(name, "not a field a template may set"))
            continue
        errors.extend(_check_value(value, fields[name].type, name))
    return [LinkError(e.where.lstrip("."), e.message) for e in errors]


#: What lifting a protection pause resets in ``tc_link_state`` (the replicator's
#: ``LinkState``, which omits defaults): paused, its rule and day, a pending close-all, and
#: the equity peak, so the drawdown is measured from the equity at resumption.
_PAUSE_FIELDS = ("paused", "paused_rule", "paused_day", "close_all_pending", "peak_equity")


async def resume_link(kv: KeyValue, link_id: str) -> bool:
    """Lift a protection's pause on ``link_id`` (``tc_link_state`` bucket); False if not paused.

    The equity peak is reset too: the drawdown is measured from the equity at resumption, or
    the same drawdown would pause the link again at once. Compare-and-set: a replicator that
    changes the state meanwhile makes this fail rather than be overwritten.

    The state is read as a plain msgpack map (this floor does not know the replicator's
    ``LinkState``); the replicator writes it with defaults omitted, so removing a field sets
    it to its default, and fields this function does not know are kept as they are.
    """
    try:
        entry = await kv.get(link_id)
    except nats.js.errors.KeyNotFoundError:
        return False
    state = msgspec.msgpack.decode(entry.value or b"\x80")
    if not isinstance(state, dict) or not state.get("paused"):
        return False
    resumed = {k: v for k, v in state.items() if k not in _PAUSE_FIELDS}
    await kv.update(link_id, msgspec.msgpack.encode(resumed), last=entry.revision)
    return True
