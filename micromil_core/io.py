"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash or a bad input mid-write never leaves a half-written checkpoint, cache entry or
results file where a good one stood.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float as None, tuples as lists: what strict JSON
    (browsers, jq, other languages) can read. Python's json would write bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (NaN and infinities become null), sorted keys, written atomically."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False, default=_plain)
    return write_text_atomic(target, text + "\n")


def _plain(value: Any) -> Any:
    """NumPy and torch scalars as Python numbers (NaN as None); anything else is a bug."""
    if hasattr(value, "item") and getattr(value, "ndim", getattr(value, "dim", lambda: 1)) in (0, ()):
        return strict_json(value.item())
    if hasattr(value, "tolist"):
        return strict_json(value.tolist())
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def claim_output_dir(out: str | os.PathLike, markers: tuple[str, ...], overwrite: bool = False) -> Path:
    """Check ``out`` before any work starts: it must be writable, and must not hold an
    earlier run (one of the ``markers`` files) unless ``overwrite``. Returns it, created."""
    from micromil_core.errors import ConfigError

    out = Path(out)
    earlier = [m for m in markers if (out / m).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(earlier)}); pass --overwrite to replace it, "
            "or choose a new --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {out} ({exc.strerror or exc}); choose a --out folder you can write to"
        ) from None
    return out


def torch_save_atomic(obj: Any, target: str | os.PathLike) -> Path:
    import torch  # here, not at the top: the CLI imports this module before it knows it needs torch

    return _atomic_write(target, "wb", lambda fh: torch.save(obj, fh))
