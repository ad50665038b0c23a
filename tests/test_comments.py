"""The copy-comment codec: fits MetaTrader's 31 characters and never puts two trades on one."""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st

from engine.core.comments import (
    COMMENT_MAX,
    copy_comment,
    is_copy,
    is_copy_of,
    master_prefixes,
    order_marker,
)

ACCOUNT = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=64)
REF = st.text(min_size=1, max_size=128)


def test_a_comment_that_fits_is_the_plain_master_and_ref() -> None:
    assert copy_comment("alpari-1001", "555") == "tc.alpari-1001.555"


def test_two_refs_sharing_their_first_31_characters_get_different_comments() -> None:
    first, second = "1" * 31 + "A", "1" * 31 + "B"
    assert copy_comment("m1", first) != copy_comment("m1", second)
    long_master = "m" * 64
    assert copy_comment(long_master, first) != copy_comment(long_master, second)


def test_masters_sharing_a_long_prefix_get_different_comments() -> None:
    a, b = "x" * 40 + "a", "x" * 40 + "b"
    assert copy_comment(a, "7") != copy_comment(b, "7")
    assert not is_copy_of(copy_comment(a, "7"), b)


def test_a_ref_that_looks_like_a_digest_is_not_taken_for_one() -> None:
    master = "m" * 30
    digested = copy_comment(master, "9" * 40)
    _, _, tail = digested.rpartition(".")
    assert copy_comment(master, tail) != digested


@given(master=ACCOUNT, ref=REF)
def test_every_comment_fits_metatrader_and_marks_its_master(master: str, ref: str) -> None:
    comment = copy_comment(master, ref)
    assert len(comment) <= COMMENT_MAX
    assert is_copy(comment)
    assert is_copy_of(comment, master)
    assert comment.startswith(master_prefixes(master))
    assert comment == copy_comment(master, ref)  # deterministic: restarts find it again


@given(a=st.tuples(ACCOUNT, REF), b=st.tuples(ACCOUNT, REF))
def test_different_trades_never_share_a_comment(a: tuple[str, str], b: tuple[str, str]) -> None:
    if a != b:
        assert copy_comment(*a) != copy_comment(*b)


@given(master=ACCOUNT, ref=REF, other=ACCOUNT)
def test_a_copy_of_one_master_is_never_taken_for_another(master: str, ref: str, other: str) -> None:
    if other != master:
        assert not is_copy_of(copy_comment(master, ref), other)


@given(order_id=st.text(min_size=1, max_size=300))
def test_order_markers_fit_and_are_never_copy_comments(order_id: str) -> None:
    marker = order_marker(order_id)
    assert len(marker) == COMMENT_MAX
    assert not is_copy(marker)


@given(master=ACCOUNT, ref=REF)
def test_comments_use_only_characters_every_broker_accepts(master: str, ref: str) -> None:
    # Brokers' MT5 gateways refuse ":" and other punctuation with 'Invalid "comment" argument'.
    for comment in (copy_comment(master, ref), order_marker(ref)):
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,31}", comment), comment


def test_a_ref_with_punctuation_is_digested_not_written() -> None:
    comment = copy_comment("m1", "12:34#5")
    assert ":" not in comment and "#" not in comment
    assert comment != copy_comment("m1", "12:34#6")
