"""Declarative link files: load ``links.toml``, validate every field, apply to the KV bucket."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from engine.errors import LinkFileError
from schemas import codec
from schemas.links import CopyLink

_FIELDS = {f.name: f for f in msgspec.structs.fields(CopyLink)}


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


def validate_link(raw: Any, index: int = 0) -> tuple[CopyLink | None, list[LinkError]]:
    """Check every field of one raw link table and report each invalid one, not just the first."""
    label = f"links[{index}]"
    if not isinstance(raw, dict):
        return None, [LinkError(label, f"must be a table, got {type(raw).__name__}")]
    link_id = raw.get("link_id")
    if isinstance(link_id, str):
        label = f"{label} ({link_id})"
    errors: list[LinkError] = []
    for name in raw:
        if name not in _FIELDS:
            errors.append(LinkError(f"{label}.{name}", "unknown field"))
    for name, info in _FIELDS.items():
        if name not in raw:
            if info.required:
                errors.append(LinkError(f"{label}.{name}", "required field is missing"))
            continue
        try:
            msgspec.convert(raw[name], info.type)
        except (msgspec.ValidationError, ValueError) as exc:
            sub, message = _split_path(str(exc))
            errors.append(LinkError(f"{label}.{name}{sub}", message))
    if errors:
        return None, errors
    try:
        return msgspec.convert(raw, CopyLink), []
    except (msgspec.ValidationError, ValueError) as exc:
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
        try:
            existing = await kv.keys()
        except nats.js.errors.NoKeysError:
            existing = []
        for key in existing:
            if key not in wanted:
                await kv.delete(key)
                removed.append(key)
    return ApplyResult(created, updated, unchanged, removed)
