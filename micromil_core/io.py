"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash or a bad input mid-write never leaves a half-written checkpoint, cache entry or
results file where a good one stood.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; give the result the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(target: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> Path:
    with atomic_path(target) as tmp:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(target)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    return _atomic_write(target, "w", lambda fh: fh.write(text))


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(target, "wb", lambda fh: fh.write(data))


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, target: str | os.PathLike) -> Path:
    return _atomic_write(target, "wb", lambda fh: torch.save(obj, fh))
