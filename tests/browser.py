"""Open a page as a person would: Debian's headless Chromium renders it to a PNG.

Chromium is a system package the test command installs (Makefile, system-tools); a test
that needs it fails with that advice instead of skipping.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


def screenshot(page: Path, png: Path, size: tuple[int, int] = (1280, 1600)) -> np.ndarray:
    """Render ``page`` (a local HTML file) to ``png``; returns its pixels (H, W, 3) uint8."""
    from PIL import Image

    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: run `make system-tools` (apt-get install chromium)"
    # No network here: the background-networking flags keep Chromium from trying to phone
    # home; a fresh profile keeps runs independent.
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={png.parent / '.chromium-profile'}",
           f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"Chromium wrote no screenshot of {page}: {proc.stderr[-800:]}"
    return np.asarray(Image.open(png).convert("RGB"))


def is_blank(pixels: np.ndarray) -> bool:
    """True when almost nothing but one background colour was drawn."""
    flat = pixels.reshape(-1, 3)
    background = np.median(flat, axis=0)
    drawn = np.abs(flat.astype(int) - background).sum(1) > 30
    return drawn.mean() < 0.01
