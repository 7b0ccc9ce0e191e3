"""Progress bars for the slow one-off steps (model conversion, loading, benchmark runs).

Bars go to stderr, so stdout stays clean for generated text and JSON. They show only when
stderr is a terminal and LMARITH_NO_PROGRESS is unset (or "0"); `lmarith --quiet` sets it.
A bar with `delay` appears only once its work has lasted that many seconds, so quick loads
print nothing at all."""
from __future__ import annotations

import os
import sys
from typing import IO, Iterable, Optional

from tqdm import tqdm

NO_PROGRESS_ENV = "LMARITH_NO_PROGRESS"


def progress_enabled(stream: Optional[IO[str]] = None) -> bool:
    """Whether bars should draw: not switched off by the environment, and a terminal to draw on."""
    if os.environ.get(NO_PROGRESS_ENV, "").strip() not in ("", "0"):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
             desc: Optional[str] = None, unit: str = "it", delay: float = 0.0,
             min_total: int = 0, leave: bool = True, file: Optional[IO[str]] = None) -> tqdm:
    """A tqdm bar on stderr (or `file`), disabled as progress_enabled says, or when the known
    total is below min_total (small models load too fast to be worth a bar)."""
    stream = sys.stderr if file is None else file
    too_small = total is not None and total < min_total
    return tqdm(iterable, total=total, desc=desc, unit=unit, delay=delay, leave=leave,
                file=stream, dynamic_ncols=True,
                disable=too_small or not progress_enabled(stream))
