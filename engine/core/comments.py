"""The copy-comment codec: how a follower's terminal remembers which master trade a copy is of.

Every follower position or pending order a connector opens carries ``copy_comment(master, ref)``,
where ``ref`` is the master's position (or pending order) id. After a restart, even with its state
file lost, a connector rebuilds *comment → ticket* from the terminal's own records, and finds the
copy of any master trade by encoding ``(master, ref)`` again: nothing is ever decoded, so nothing
can be mis-read. The replicator puts the same comment on the follower orders it builds.

MetaTrader keeps ``COMMENT_MAX`` (31) characters of a comment, so a comment is never cut:

- ``tc:<master>:<ref>`` when it fits. Account ids never hold ``:``, so this form is one-to-one.
- otherwise ``tc:~<key>:<ref>``, where ``key`` is a 10-character base-36 digest of the master
  (~51 bits); account ids never start with ``~``, so the two forms cannot meet.
- and when even that is too long (or ``ref`` starts with ``#``), ``tc:~<key>:#<digest>``, with a
  15-character base-36 digest of the ref (~77 bits).

Two different long trades share a comment only if BLAKE2b collides on both digests at once; the
odds for a follower holding a million copies are below 10⁻¹¹. Closing and close-by requests carry
``tc#<digest of the follower order id>`` so that a redelivered order recognises its own deals.
"""

from __future__ import annotations

import hashlib

#: Characters of a comment MetaTrader 4 and 5 keep.
COMMENT_MAX = 31
COPY_PREFIX = "tc:"
MARKER_PREFIX = "tc#"
_DIGEST_MARK = "~"
_REF_DIGEST_MARK = "#"
_MASTER_KEY_LEN = 10
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _digest(text: str, length: int) -> str:
    """``length`` base-36 characters of BLAKE2b(``text``): more bits per character than hex."""
    number = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=20).digest(), "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 36)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def _master_key(master: str) -> str:
    return f"{COPY_PREFIX}{_DIGEST_MARK}{_digest(master, _MASTER_KEY_LEN)}:"


def copy_comment(master: str, ref: str) -> str:
    """The comment of the follower's copy of ``master``'s position or pending order ``ref``."""
    plain = f"{COPY_PREFIX}{master}:{ref}"
    if len(plain) <= COMMENT_MAX:
        return plain
    key = _master_key(master)
    if len(key) + len(ref) <= COMMENT_MAX and not ref.startswith(_REF_DIGEST_MARK):
        return key + ref
    room = COMMENT_MAX - len(key) - len(_REF_DIGEST_MARK)
    return f"{key}{_REF_DIGEST_MARK}{_digest(ref, room)}"


def master_prefixes(master: str) -> tuple[str, str]:
    """Every prefix a copy of one of ``master``'s trades can start with."""
    return f"{COPY_PREFIX}{master}:", _master_key(master)


def is_copy(comment: str) -> bool:
    """Whether ``comment`` marks a copy made by tradecopy (not a manual trade)."""
    return comment.startswith(COPY_PREFIX)


def is_copy_of(comment: str, master: str) -> bool:
    """Whether ``comment`` marks a copy of one of ``master``'s trades."""
    return comment.startswith(master_prefixes(master))


def order_marker(order_id: str) -> str:
    """The comment of the requests a follower order makes (closes, close-by)."""
    return MARKER_PREFIX + _digest(order_id, COMMENT_MAX - len(MARKER_PREFIX))
