"""What the connector writes into order comments, so the terminal itself remembers copies.

A follower position or pending order carries ``tc:<master>:<ref>``: after a restart (even with
its state file lost) the connector finds the copy of any master position from the terminal's
own records. Closing deals carry ``tc#<digest of the follower order id>``, so an order that ran
is recognised when it is redelivered. MetaTrader keeps 31 characters: a comment that would be
longer is shortened by digests, never truncated (two refs must never share one comment).
"""

from __future__ import annotations

import hashlib

from connectors.mt5.protocol import COMMENT_MAX

COPY_PREFIX = "tc:"
MARKER_PREFIX = "tc#"
_MASTER_KEY_LEN = 8


def _digest(text: str, length: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()[:length]


def copy_comment(master: str, ref: str) -> str:
    """The comment of the follower's copy of master position or pending order ``ref``."""
    plain = f"{COPY_PREFIX}{master}:{ref}"
    if len(plain) <= COMMENT_MAX:
        return plain
    key = _digest(master, _MASTER_KEY_LEN)
    short = f"{COPY_PREFIX}{key}:{ref}"
    if len(short) <= COMMENT_MAX:
        return short
    room = COMMENT_MAX - len(COPY_PREFIX) - _MASTER_KEY_LEN - 2
    return f"{COPY_PREFIX}{key}:#{_digest(ref, room)}"


def master_prefixes(master: str) -> tuple[str, str]:
    """Every prefix a copy of one of ``master``'s trades can start with."""
    return f"{COPY_PREFIX}{master}:", f"{COPY_PREFIX}{_digest(master, _MASTER_KEY_LEN)}:"


def order_marker(order_id: str) -> str:
    """The comment of the requests a follower order makes (closes, close-by)."""
    return MARKER_PREFIX + _digest(order_id, COMMENT_MAX - len(MARKER_PREFIX))


def is_copy(comment: str) -> bool:
    return comment.startswith(COPY_PREFIX)
