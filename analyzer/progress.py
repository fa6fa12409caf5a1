"""Progress bars for long analyses: shown on a terminal, silent in logs and pipes (a bar
redrawn into a CI log or a file is thousands of lines), off when the caller says so."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, progress: bool, **options: Any) -> tqdm:
    """tqdm over `iterable` (or with total=…), drawn only when `progress` and stderr is a
    terminal (tqdm's disable=None)."""
    return tqdm(iterable, disable=None if progress else True, **options)
