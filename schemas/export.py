"""JSON Schema export of every wire message to ``schemas/json/``."""

from __future__ import annotations

import json
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
from schemas.reports import ExecutionReport

JSON_DIR = Path(__file__).parent / "json"

#: file stem → message type. One file per message family.
MESSAGES: dict[str, Any] = {
    "master_event": MasterEvent,
    "follower_order": FollowerOrder,
    "follower_order_batch": FollowerOrderBatch,
    "execution_report": ExecutionReport,
    "copy_decision": CopyDecision,
    "account_state": AccountState,
    "symbol_spec": SymbolSpec,
    "fx_rate": FxRate,
    "quote": Quote,
    "emergency_stop": EmergencyStop,
    "copy_link": CopyLink,
    "bridge_terminal_frame": TerminalFrame,
    "bridge_connector_frame": ConnectorFrame,
}


def render_schemas() -> dict[str, str]:
    """File name → JSON text, deterministic (sorted keys, trailing newline)."""
    out: dict[str, str] = {}
    for stem, tp in MESSAGES.items():
        schema = msgspec.json.schema(tp)
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"tradecopy/v{WIRE_VERSION}/{stem}.json",
            "title": stem,
            **schema,
        }
        out[f"{stem}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


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
