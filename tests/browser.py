"""Open a page as a person would: Debian's headless Chromium renders it to a PNG.

Chromium is a system package the test command installs (Makefile, system-tools); a test
that needs it fails with that advice instead of skipping.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
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


# Injected into a copy of the page (the page itself runs no scripts). After every image has
# loaded or failed it writes what a person would see into <pre id="probe"> as JSON:
#   broken      the src of each image that did not load (naturalWidth 0)
#   images      [width, height] of each image as laid out
#   overlaps    text lines that run over an image or over another element's text line
#   overflow    True when the page is wider than the window (a sideways scroll bar)
#   width       [window width, page width]; wide: the elements reaching past the window
#   text        the page's visible text (innerText)
_PROBE = r"""
<script>
window.addEventListener('load', () => {
  const boxes = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode());) {
    if (!node.textContent.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const r of range.getClientRects()) boxes.push([node.parentElement, r, node.textContent.trim().slice(0, 60)]);
  }
  const cut = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > 1
                     && Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 1;
  const imgs = [...document.images];
  const overlaps = [];
  for (const [el, r, t] of boxes) {
    for (const img of imgs) if (cut(r, img.getBoundingClientRect())) overlaps.push([t, 'image ' + img.getAttribute('src').slice(0, 40)]);
    for (const [el2, r2, t2] of boxes) if (el2 !== el && cut(r, r2) && t < t2) overlaps.push([t, t2]);
  }
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src').slice(0, 80)),
    images: imgs.map(i => [i.width, i.height]),
    overlaps: overlaps,
    overflow: document.documentElement.scrollWidth > window.innerWidth + 1,
    width: [window.innerWidth, document.documentElement.scrollWidth],
    wide: [...document.body.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).map(e => e.tagName + ' ' + e.textContent.slice(0, 40)).slice(0, 5),
    text: document.body.innerText,
  });
  document.body.appendChild(out);
});
</script>
"""


def probe(page: Path, width: int = 1280) -> dict:
    """Open ``page`` in headless Chromium ``width`` pixels wide and report what loaded and
    what overlaps (see ``_PROBE``); the page's own folder resolves its relative links."""
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: run `make system-tools` (apt-get install chromium)"
    source = page.read_text()
    base = f'<base href="{page.resolve().parent.as_uri()}/">'
    copy = source.replace("<head>", "<head>" + base, 1) if "<head>" in source else base + source
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / page.name
        probed.write_text(copy.replace("</body>", _PROBE + "</body>", 1) if "</body>" in copy
                          else copy + _PROBE)
        # --virtual-time-budget lets the load event (and our script) run before the dump.
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={Path(tmp) / 'profile'}",
               f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom",
               probed.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"Chromium did not run the probe on {page}: {proc.stderr[-800:]}"
    return json.loads(html.unescape(found.group(1)))
