"""Structured logging setup: JSON lines (or a console view) on stderr via structlog."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import Processor

__all__ = ["configure_logging"]

# Identifies the root handler we install, so reconfiguring replaces it instead of
# stacking a second one (which would print every stdlib record twice).
_HANDLER_NAME = "tradecopy-structlog"
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS  # a dict with int keys must not crash a log call
# Structured tracebacks without frame locals: those can hold broker credentials and
# would be shipped verbatim to the log aggregator.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    ExceptionDictTransformer(show_locals=False)
)


def configure_logging(level: str = "info", json: bool = True) -> None:
    """Route structlog and stdlib logging (nats-py, aiohttp, asyncio) to stderr.

    Safe to call repeatedly, e.g. once at import time and again after CLI flags are
    parsed: the latest call wins for every logger, including ones already created.
    """
    try:
        threshold = logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    stderr_bytes = getattr(sys.stderr, "buffer", None)
    native_tail: list[Processor]
    logger_factory: Any
    if json:
        exc_and_stack: list[Processor] = [
            structlog.processors.StackInfoRenderer(),
            _DICT_TRACEBACKS,
        ]
        text_renderer: Processor = structlog.processors.JSONRenderer(
            serializer=_orjson_text, option=_ORJSON_OPTIONS
        )
        if stderr_bytes is not None:
            # orjson produces bytes; writing them straight to the binary stream
            # skips a decode/encode round trip on every log line.
            native_tail = [
                *exc_and_stack,
                structlog.processors.JSONRenderer(serializer=orjson.dumps, option=_ORJSON_OPTIONS),
            ]
            logger_factory = structlog.BytesLoggerFactory(stderr_bytes)
        else:
            native_tail = [*exc_and_stack, text_renderer]
            logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        # ConsoleRenderer formats exceptions itself, so no dict tracebacks here.
        text_renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        native_tail = [structlog.processors.StackInfoRenderer(), text_renderer]
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)

    structlog.configure(
        processors=[*shared, *native_tail],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=logger_factory,
        # Cached loggers would keep the configuration of their first use, and
        # module-level loggers are often used before the CLI calls us.
        cache_logger_on_first_use=False,
    )
    _route_stdlib(threshold, shared, text_renderer, with_tracebacks=json)


def _route_stdlib(
    threshold: int, shared: list[Processor], renderer: Processor, *, with_tracebacks: bool
) -> None:
    post: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if with_tracebacks:
        post.append(_DICT_TRACEBACKS)
    post.append(renderer)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=post,
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(threshold)


def _orjson_text(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()
