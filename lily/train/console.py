"""What a run shows while it works: progress bars on a terminal, and what Ctrl-C ends with."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what was kept and how to go on (`lily` exits with code 130)."""


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str | None, total: int | None = None,
             unit: str = "batch", show: bool = True, leave: bool = False) -> Any:  # fmt: skip
    """A tqdm bar on stderr, drawn only on a terminal, and only where `show` (e.g. on the main process)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True,
                disable=None if show else True)  # fmt: skip
