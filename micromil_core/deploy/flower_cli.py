"""Run Flower's own programs (``flower-superlink``, ``flower-supernode``, ``flwr``).

They are looked up next to the running Python first, so the versions installed with
micromil-fl are used even when the virtual environment is not on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from micromil_core.errors import MicroMILError


class FlowerCommandError(MicroMILError):
    """A Flower command failed; the message carries its own explanation."""


def program(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FlowerCommandError(
            f"`{name}` not found; install micromil-fl (it depends on flwr) into this environment"
        )
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's programs: its own home folder, and PATH led by the folder
    holding them (a SuperLink/SuperNode starts further Flower programs by name)."""
    path = os.environ.get("PATH", "")
    return {**os.environ, "FLWR_HOME": str(flwr_home),
            "PATH": os.pathsep.join([str(Path(program("flwr")).parent), path])}


def flwr_json(args: list[str], env: dict[str, str], timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; return the JSON, raise with Flower's message on failure."""
    proc = subprocess.run(
        [program("flwr"), *args, "--format", "json"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise FlowerCommandError(
            f"`flwr {' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()[-400:]}"
        ) from None
    if not out.get("success", False):
        raise FlowerCommandError(f"`flwr {' '.join(args)}`: {out.get('error-message', out)}")
    return out
