"""One progress bar for every long loop a person waits on (extraction, writing a dataset,
explanations): tqdm when the caller asks for it (the CLI does), the plain items otherwise."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, enabled: bool, total: int | None = None) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar (on stderr, gone when done) when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm  # a declared dependency; imported only where a bar is shown

    return tqdm(items, desc=desc, unit=unit, total=total, leave=False)
