"""Progress bars for passes over the data: shown in terminals, notebooks and logs alike, with a count and a rate.

tqdm hides a bar (``disable=None``) when its stream is not a terminal, so a notebook cell, a Kaggle or Colab
session or ``> log`` would show minutes of nothing; here the bar always shows, redrawn every
`LOG_INTERVAL_S` seconds when the stream is not a terminal (a log grows by a line a refresh, not hundreds).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

# Seconds between refreshes when the output is not a terminal: a few lines a minute in a log or notebook cell.
LOG_INTERVAL_S = 15.0
# Seconds between refreshes in a terminal (tqdm's default).
TERMINAL_INTERVAL_S = 0.1


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    stream: TextIO | None = None,
) -> tqdm:
    """A tqdm bar over ``iterable`` or ``total`` items on stderr, with count, rate and time left; sparse in logs."""
    stream = stream if stream is not None else sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    interval = TERMINAL_INTERVAL_S if interactive else LOG_INTERVAL_S
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=not enabled, mininterval=interval,
                maxinterval=max(interval, 10.0), dynamic_ncols=interactive, ascii=None if interactive else True)
