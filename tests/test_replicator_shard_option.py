"""Which link shard `tradecopy replicator run` plans: ``--shard`` / ``--shards`` and their
environment variables, as a StatefulSet pod sets them (no NATS: only the parsing, and the CLI's
refusal of a bad value before it connects anywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import ENV_REPLICATOR_SHARD, ENV_REPLICATOR_SHARDS, parse_shard

ROOT = Path(__file__).resolve().parent.parent

# A bad shard must be refused before the replicator connects: nothing listens here.
NO_NATS = "nats://127.0.0.1:1"


def test_without_a_shard_every_link_is_planned() -> None:
    assert parse_shard(None, None, {}) == (0, 1)


def test_i_of_n_works_from_the_option_and_from_the_environment() -> None:
    assert parse_shard("1/4", None, {}) == (1, 4)
    assert parse_shard(None, None, {ENV_REPLICATOR_SHARD: "3/4"}) == (3, 4)
    assert parse_shard("0", None, {}) == (0, 1)
    # The option wins over the environment.
    assert parse_shard("0/2", None, {ENV_REPLICATOR_SHARD: "1/2"}) == (0, 2)
    # A shard count that agrees with i/n is fine.
    assert parse_shard("1/2", "2", {}) == (1, 2)
    assert parse_shard("1/2", None, {ENV_REPLICATOR_SHARDS: "2"}) == (1, 2)


def test_a_pod_index_takes_the_shard_count_from_shards() -> None:
    pod = {ENV_REPLICATOR_SHARD: "1", ENV_REPLICATOR_SHARDS: "2"}
    assert parse_shard(None, None, pod) == (1, 2)
    assert parse_shard(None, None, {**pod, ENV_REPLICATOR_SHARD: "0"}) == (0, 2)
    assert parse_shard("1", "3", {}) == (1, 3)
    assert parse_shard(None, "4", {ENV_REPLICATOR_SHARD: "2"}) == (2, 4)  # --shards wins
    assert parse_shard("2", None, {ENV_REPLICATOR_SHARDS: "3"}) == (2, 3)


def test_pod_indexes_beyond_the_shard_count_fold_onto_every_shard_evenly() -> None:
    """2n pods of one StatefulSet: two instances of each of the n shards."""
    shards = 3
    planned = [parse_shard(str(index), str(shards), {}) for index in range(2 * shards)]
    assert planned == [(0, 3), (1, 3), (2, 3), (0, 3), (1, 3), (2, 3)]


@pytest.mark.parametrize(
    ("shard", "shards", "env", "reason"),
    [
        ("2/2", None, {}, "shard 2 does not exist among 2"),
        ("1", None, {}, "shard 1 does not exist among 1"),
        ("1/0", None, {}, "1 to 1024, not 0"),
        ("0/1025", None, {}, "1 to 1024, not 1025"),
        ("-1/2", None, {}, "shard index must be a whole number"),
        ("x", None, {}, "shard index must be a whole number, not 'x'"),
        ("1/2/3", None, {}, "number of shards must be a whole number, not '2/3'"),
        ("1/", None, {}, "number of shards must be a whole number, not ''"),
        ("1", "0", {}, "1 to 1024, not 0"),
        ("1", "two", {}, "number of shards must be a whole number, not 'two'"),
        ("0/2", "4", {}, "names 2 shards, but the shard count is 4"),
        ("0/2", None, {ENV_REPLICATOR_SHARDS: "3"}, "names 2 shards, but the shard count is 3"),
        (None, "2", {}, "no shard index"),
        (None, None, {ENV_REPLICATOR_SHARDS: "2"}, "no shard index"),
        # The pod-index label is missing (Kubernetes before 1.28): never shard 0 for every pod.
        (None, None, {ENV_REPLICATOR_SHARD: "", ENV_REPLICATOR_SHARDS: "2"}, "1.28"),
        ("", "2", {}, "the shard is empty"),
    ],
)
def test_a_bad_shard_is_refused_with_the_reason(
    shard: str | None, shards: str | None, env: dict[str, str], reason: str
) -> None:
    with pytest.raises(ValueError) as caught:
        parse_shard(shard, shards, env)
    assert reason in str(caught.value)


def _replicator_run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`tradecopy replicator run` in its own process: were a bad shard let through, it would
    keep trying to reach NO_NATS, and the timeout would fail the test instead of hanging it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_REPLICATOR")}
    command = ["replicator", "run", "--nats-url", NO_NATS, "--metrics-port", "-1", *argv]
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *command],
        env={**environ, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env", "reason"),
    [
        ((), {ENV_REPLICATOR_SHARD: "", ENV_REPLICATOR_SHARDS: "2"}, "the shard is empty"),
        (("--shard", "0/2", "--shards", "3"), {}, "names 2 shards, but the shard count is 3"),
        (("--shard", "1"), {ENV_REPLICATOR_SHARDS: "x"}, "not 'x'"),
    ],
)
def test_the_cli_refuses_a_bad_shard_before_it_connects(
    argv: tuple[str, ...], env: dict[str, str], reason: str
) -> None:
    done = _replicator_run(*argv, env=env)
    assert done.returncode == 2, done.stderr
    assert "--shard: " in done.stderr and reason in done.stderr
