"""Run one strategy on closed candles in a fresh, limited subprocess: a signal or a failure."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

from engine.signals.candles import Candle
from engine.signals.strategy import Signal
from engine.signals.versions import StrategyVersion
from schemas.signals import FailureKind as FailureKind  # a wire type; its old path stays

#: The child's stdout carries exactly one reply; more than this is not a reply.
MAX_REPLY_BYTES = 64 * 1024
#: How much of the child's stderr (its prints, its traceback) a failure message keeps.
STDERR_TAIL_BYTES = 2 * 1024


class SandboxLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one strategy run may use."""

    wall_s: Annotated[float, msgspec.Meta(gt=0.0, le=600.0)] = 5.0
    """Wall-clock time from start to reply, interpreter start-up included; killed after it."""
    cpu_s: Annotated[int, msgspec.Meta(ge=1, le=600)] = 5
    """CPU seconds (``RLIMIT_CPU``): the kernel stops a busy loop even if the clock is slow."""
    memory_mb: Annotated[int, msgspec.Meta(ge=64, le=65_536)] = 512
    """Address space (``RLIMIT_AS``), interpreter included (about 60 MB of it)."""


class SignalResult(msgspec.Struct, frozen=True, kw_only=True):
    signal: Signal
    elapsed_s: float


class StrategyFailure(msgspec.Struct, frozen=True, kw_only=True):
    kind: FailureKind
    message: str
    elapsed_s: float = 0.0


SandboxOutcome = SignalResult | StrategyFailure


# ------------------------------------------------------------------ the wire to the child


class _Request(msgspec.Struct, frozen=True, kw_only=True):
    shipped: str | None
    source: str
    parameters: dict[str, Any]
    columns: tuple[
        list[float], list[float], list[float], list[float], list[int], list[int], list[int]
    ]


class _Ok(msgspec.Struct, frozen=True, tag="ok"):
    signal: Signal


class _Failed(msgspec.Struct, frozen=True, tag="failed"):
    kind: FailureKind
    message: str


_reply_decoder = msgspec.msgpack.Decoder(_Ok | _Failed)
_encoder = msgspec.msgpack.Encoder()


# ------------------------------------------------------------------ the parent side


async def run_strategy(
    version: StrategyVersion, candles: Sequence[Candle], limits: SandboxLimits
) -> SandboxOutcome:
    """Run ``version`` once on ``candles`` (oldest first) in a fresh interpreter.

    Never raises for anything the strategy does: every way it can go wrong is a
    :class:`StrategyFailure`. The child is its own process group, killed whole on expiry.
    """
    request = _encoder.encode(
        _Request(
            shipped=version.shipped,
            source=version.source,
            parameters=dict(version.parameters),
            columns=(
                [c.open for c in candles],
                [c.high for c in candles],
                [c.low for c in candles],
                [c.close for c in candles],
                [c.open_time_ns for c in candles],
                [c.close_time_ns for c in candles],
                [c.ticks for c in candles],
            ),
        )
    )
    argv = [
        sys.executable,
        "-I",  # no PYTHON* variables, no user site, no script directory on the path
        "-B",  # no .pyc writes: the child refuses file writes once the strategy loads
        "-m",
        __name__,
        str(limits.memory_mb * 1024 * 1024),
        str(limits.cpu_s),
    ]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tc-strategy-") as cwd:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=_CHILD_ENV,
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(limits.wall_s):
                reply, stderr, _ = await asyncio.gather(
                    _read_head(proc.stdout, MAX_REPLY_BYTES + 1),
                    _read_tail(proc.stderr, STDERR_TAIL_BYTES),
                    _feed(proc.stdin, request),
                )
                returncode = await proc.wait()
        except TimeoutError:
            return StrategyFailure(
                kind=FailureKind.TIMEOUT,
                message=f"ran longer than {limits.wall_s:g}s (wall clock); killed",
                elapsed_s=time.monotonic() - started,
            )
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
    elapsed = time.monotonic() - started
    return _outcome(reply, stderr, returncode, limits, elapsed)


def _outcome(
    reply: bytes, stderr: bytes, returncode: int, limits: SandboxLimits, elapsed: float
) -> SandboxOutcome:
    said = _tail_text(stderr)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not reply:
        # SIGXCPU at the soft CPU limit; the kernel's SIGKILL at the hard one a second later.
        return StrategyFailure(
            kind=FailureKind.TIMEOUT,
            message=f"used more than {limits.cpu_s}s of CPU; stopped",
            elapsed_s=elapsed,
        )
    if not reply:
        if "MemoryError" in said:
            return StrategyFailure(
                kind=FailureKind.MEMORY,
                message=f"over the {limits.memory_mb} MB memory limit",
                elapsed_s=elapsed,
            )
        if returncode == 0:
            return StrategyFailure(
                kind=FailureKind.BAD_OUTPUT, message="exited without a reply", elapsed_s=elapsed
            )
        return StrategyFailure(
            kind=FailureKind.CRASH,
            message=f"exited with code {returncode}" + (f": {said}" if said else ""),
            elapsed_s=elapsed,
        )
    if len(reply) > MAX_REPLY_BYTES:
        return StrategyFailure(
            kind=FailureKind.BAD_OUTPUT,
            message=f"replied more than {MAX_REPLY_BYTES} bytes",
            elapsed_s=elapsed,
        )
    try:
        decoded = _reply_decoder.decode(reply)
    except msgspec.DecodeError as exc:
        return StrategyFailure(
            kind=FailureKind.BAD_OUTPUT,
            message=f"reply is not a signal: {exc} (first bytes {reply[:32]!r})",
            elapsed_s=elapsed,
        )
    if isinstance(decoded, _Failed):
        return StrategyFailure(kind=decoded.kind, message=decoded.message, elapsed_s=elapsed)
    return SignalResult(signal=decoded.signal, elapsed_s=elapsed)


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    # A child that dies before reading its request must not fail the parent.
    with contextlib.suppress(ConnectionError):
        stdin.write(data)
        await stdin.drain()
        stdin.close()
        await stdin.wait_closed()


async def _read_head(stream: asyncio.StreamReader, limit: int) -> bytes:
    """The first ``limit`` bytes; the rest is read and dropped so the child never blocks."""
    kept = bytearray()
    while chunk := await stream.read(65_536):
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept)


async def _read_tail(stream: asyncio.StreamReader, limit: int) -> bytes:
    """The last ``limit`` bytes: a traceback ends the output, the noise before it does not."""
    kept = bytearray()
    while chunk := await stream.read(65_536):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return bytes(kept)


def _tail_text(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return " | ".join(lines[-3:])[-500:]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# ------------------------------------------------------------------ the child side

#: Nothing of the worker's environment; numerical libraries on one thread, so a run uses one
#: core and its thread buffers stay inside the memory limit.
_CHILD_ENV = {
    "LC_ALL": "C.UTF-8",
    "PATH": "/usr/bin:/bin",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

_EXIT_FORBIDDEN = 3

#: Audit events a strategy may not raise, as prefixes ("os.exec" covers ``os.execv`` too).
_FORBIDDEN_EVENTS = (
    "socket.",
    "subprocess.",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "os.remove",
    "os.unlink",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.putenv",
    "shutil.",
    "ctypes.",
    "mmap.",
    "pty.",
    "sys.remote_exec",
    "webbrowser.",
    "urllib.",
    "http.client.",
    "ftplib.",
    "smtplib.",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _child_main(memory_bytes: int, cpu_s: int) -> None:
    """Limits, then the request, then the hook, then the strategy: nothing it loads runs
    before the hook, and nothing it does can unset the limits (hard limits only go down)."""
    import resource

    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    # The reply goes out on a private copy of stdout; fd 1 and sys.stdout become stderr, so
    # a strategy's prints land in the log tail instead of corrupting the reply.
    channel = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=_Request)

    def reply(message: _Ok | _Failed) -> None:
        data = _encoder.encode(message)
        while data:
            data = data[os.write(channel, data) :]

    def refuse(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            if not (flags & _WRITE_FLAGS or any(c in mode for c in "wax+")):
                return
            what = f"writing the file {args[0]!r}"
        elif event.startswith(_FORBIDDEN_EVENTS):
            what = event
        else:
            return
        # Exit from inside the hook: a strategy that catches the exception does not get to
        # go on and return a signal.
        reply(_Failed(kind=FailureKind.FORBIDDEN, message=f"not allowed in a strategy: {what}"))
        os._exit(_EXIT_FORBIDDEN)

    from engine.signals.strategy import Candles
    from engine.signals.versions import ENTRY_POINT, PARAMS_CLASS, bind_shipped

    candles = Candles(request.columns, len(request.columns[0]))
    try:
        if request.shipped is not None:
            run = bind_shipped(request.shipped, request.parameters)
            sys.addaudithook(refuse)
        else:
            code = compile(request.source, "<strategy>", "exec")
            _preload(request.source)
            sys.addaudithook(refuse)
            namespace: dict[str, Any] = {"__name__": "strategy", "__builtins__": __builtins__}
            exec(code, namespace)
            entry = namespace.get(ENTRY_POINT)
            if not callable(entry):
                raise TypeError(f"the module defines no function {ENTRY_POINT!r}")
            params: Any = dict(request.parameters)
            params_type = namespace.get(PARAMS_CLASS)
            if isinstance(params_type, type) and issubclass(params_type, msgspec.Struct):
                params = msgspec.convert(params, params_type)

            def run(candles: Candles) -> Any:
                return entry(candles, params)

        result = run(candles)
    except MemoryError:
        reply(_Failed(kind=FailureKind.MEMORY, message="over the memory limit"))
        return
    except BaseException as exc:  # the strategy's own failure, whatever it is, is reported
        frames = traceback.extract_tb(exc.__traceback__)
        where = next(
            (f"line {f.lineno}" for f in reversed(frames) if f.filename == "<strategy>"), ""
        )
        text = f"{type(exc).__name__}: {exc}" + (f" ({where})" if where else "")
        reply(_Failed(kind=FailureKind.CRASH, message=text[:1000]))
        return
    reply(_as_reply(result))


#: Libraries a strategy may use whose import does what the hook refuses (numpy sets its
#: threads' environment variables with ``os.putenv``): imported before the hook, when the
#: strategy uses them and they are installed. What the strategy then calls is hooked as usual.
_PRELOADED = ("numpy", "pandas")


def _preload(source: str) -> None:
    """Import the libraries of ``_PRELOADED`` the source imports, or pandas when it calls
    ``.frame()``; one that is not installed is left to fail in the strategy's own import."""
    import ast
    import importlib
    import importlib.util

    wanted: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            wanted.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            wanted.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Attribute) and node.attr == "frame":
            wanted.add("pandas")
    for name in _PRELOADED:
        if name in wanted and importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _as_reply(result: Any) -> _Ok | _Failed:
    try:
        signal_ = result if isinstance(result, Signal) else msgspec.convert(result, Signal)
    except (msgspec.ValidationError, TypeError) as exc:
        return _Failed(
            kind=FailureKind.BAD_OUTPUT,
            message=f"returned {type(result).__name__}, not a Signal: {exc}"[:1000],
        )
    for name in ("sl", "tp"):
        price = getattr(signal_, name)
        if price is not None and not (math.isfinite(price) and price > 0):
            return _Failed(kind=FailureKind.BAD_OUTPUT, message=f"{name} {price!r} is not a price")
    return _Ok(signal=signal_)


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the worker that started it dies (e.g. SIGKILLed), so
    no orphan run goes on after its worker's claim was taken over."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
