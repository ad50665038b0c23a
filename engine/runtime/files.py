"""Files the services keep: state written atomically, TOML configs read with clear errors."""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from engine.core.errors import TradecopyError


def write_atomically(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new, never half.

    ``durable=False`` skips the fsync: the file survives a crash of the process (what a
    connector restart needs, at every order) but not of the machine. The file is 0600 from
    its creation (``mkstemp``), so secrets (seeds, server configs) are written this way too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_new_secret(path: Path, text: str) -> Path:
    """Write a secret into a file that must not exist yet, readable only by its owner (0600
    from its creation). ``FileExistsError`` when it exists: a key is never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def load_toml(path: Path, tp: Any) -> Any:
    """A config file as ``tp``; every problem becomes one clear error naming the file."""
    try:
        return msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), tp)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise TradecopyError(f"{path}: {exc}") from exc
