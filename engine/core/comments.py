"""The copy-comment codec: how a follower's terminal remembers which master trade a copy is of.

Every follower position or pending order a connector opens carries ``copy_comment(master, ref)``,
where ``ref`` is the master's position (or pending order) id. After a restart, even with its state
file lost, a connector rebuilds *comment → ticket* from the terminal's own records, and finds the
copy of any master trade by encoding ``(master, ref)`` again: nothing is ever decoded, so nothing
can be mis-read. The replicator puts the same comment on the follower orders it builds.

MetaTrader keeps ``COMMENT_MAX`` (31) characters, and brokers' MT5 gateways refuse some
punctuation (``:`` among them) with ``Invalid "comment" argument``, so a comment holds only
letters, digits, ``_``, ``-`` and ``.``, and is never cut:

- ``tc.<master>.<ref>`` when it fits and ``ref`` uses only those characters (and does not start
  with ``_``). Account ids never hold ``.``, so this form is one-to-one.
- otherwise ``tc-<key>.<ref>``, where ``key`` is a 10-character base-36 digest of the master
  (~51 bits); the ``tc-`` prefix keeps the two forms apart.
- and when even that is too long, or ``ref`` has other characters, ``tc-<key>._<digest>``, with
  a base-36 digest of the ref of up to 15 characters (~77 bits); a raw ref never starts with
  ``_``, so a digest is never taken for a ref.

Two different long trades share a comment only if BLAKE2b collides on both digests at once; the
odds for a follower holding a million copies are below 10⁻¹¹. Closing and close-by requests carry
``tc_<digest of the follower order id>`` so that a redelivered order recognises its own deals;
``tc_`` is neither copy prefix, so a marker is never taken for a copy.
"""

from __future__ import annotations

import hashlib
import re

#: Characters of a comment MetaTrader 4 and 5 keep.
COMMENT_MAX = 31
#: The prefixes of a copy's comment: plain, and with the master's digest.
COPY_PREFIXES = ("tc.", "tc-")
MARKER_PREFIX = "tc_"
_PLAIN, _KEYED = COPY_PREFIXES
_REF_DIGEST_MARK = "_"
_MASTER_KEY_LEN = 10
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: What every broker's gateway accepts in a comment.
_SAFE = re.compile(r"[A-Za-z0-9_.-]*")


def _digest(text: str, length: int) -> str:
    """``length`` base-36 characters of BLAKE2b(``text``): more bits per character than hex."""
    number = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=20).digest(), "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 36)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def _keyed_prefix(master: str) -> str:
    return f"{_KEYED}{_digest(master, _MASTER_KEY_LEN)}."


def _raw_ref(ref: str) -> bool:
    return _SAFE.fullmatch(ref) is not None and not ref.startswith(_REF_DIGEST_MARK)


def copy_comment(master: str, ref: str) -> str:
    """The comment of the follower's copy of ``master``'s position or pending order ``ref``."""
    raw = _raw_ref(ref)
    plain = f"{_PLAIN}{master}.{ref}"
    if raw and len(plain) <= COMMENT_MAX and _SAFE.fullmatch(master):
        return plain
    prefix = _keyed_prefix(master)
    if raw and len(prefix) + len(ref) <= COMMENT_MAX:
        return prefix + ref
    room = COMMENT_MAX - len(prefix) - len(_REF_DIGEST_MARK)
    return f"{prefix}{_REF_DIGEST_MARK}{_digest(ref, room)}"


def master_prefixes(master: str) -> tuple[str, str]:
    """Every prefix a copy of one of ``master``'s trades can start with."""
    return f"{_PLAIN}{master}.", _keyed_prefix(master)


def is_copy(comment: str) -> bool:
    """Whether ``comment`` marks a copy made by tradecopy (not a manual trade)."""
    return comment.startswith(COPY_PREFIXES)


def is_copy_of(comment: str, master: str) -> bool:
    """Whether ``comment`` marks a copy of one of ``master``'s trades."""
    return comment.startswith(master_prefixes(master))


def is_marker(comment: str) -> bool:
    """Whether ``comment`` marks a closing request of a follower order (``order_marker``)."""
    return comment.startswith(MARKER_PREFIX)


def order_marker(order_id: str) -> str:
    """The comment of the requests a follower order makes (closes, close-by)."""
    return MARKER_PREFIX + _digest(order_id, COMMENT_MAX - len(MARKER_PREFIX))
