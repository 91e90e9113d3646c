"""`HistogramCache`: label-map histograms kept in one ``.npz`` file between selection runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers.utils import logging

from ..atomic import write_atomically

logger = logging.get_logger(__name__)

CACHE_FILE = "class_stats.npz"
CACHE_VERSION = 1


class HistogramCache:
    """Label-map histograms keyed by a file's (path, size, modification time), stored as one ``.npz`` file.

    Entries of files not seen in a run are kept, so switching between datasets, levels or ``--max_samples`` reuses
    them; a file whose size or time changed is decoded again.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._index: dict[str, int] = {}
        self._stamps = np.zeros((0, 2), dtype=np.int64)
        self._histograms = np.zeros((0, 256), dtype=np.int64)
        self._new: dict[str, tuple[int, int, np.ndarray]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                version = int(stored["version"])
                if version != CACHE_VERSION:
                    logger.warning(f"{self.path}: cache format {version} is not {CACHE_VERSION}; ignored")
                    return
                keys = stored["keys"].tolist()
                stamps = stored["stamps"]
                histograms = stored["histograms"]
        except (OSError, ValueError, KeyError) as err:
            logger.warning(f"{self.path}: unreadable histogram cache ({err}); every label map is decoded again")
            return
        if not (len(keys) == len(stamps) == len(histograms) and histograms.shape[1:] == (256,)):
            logger.warning(f"{self.path}: inconsistent histogram cache; ignored")
            return
        self._index = {key: i for i, key in enumerate(keys)}
        self._stamps = stamps
        self._histograms = histograms

    def lookup(self, keys: Sequence[str], stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For (key, size/time stamp) pairs: which are cached and fresh, and their (hits, 256) histograms."""
        positions = np.array([self._index.get(key, -1) for key in keys], dtype=np.int64)
        hit = positions >= 0
        hit[hit] = (self._stamps[positions[hit]] == stamps[hit]).all(axis=1)
        return hit, self._histograms[positions[hit]]

    def add(self, key: str, stamp: Sequence[int], histogram: np.ndarray) -> None:
        """Remember a freshly computed histogram (written by `save`)."""
        self._new[key] = (int(stamp[0]), int(stamp[1]), histogram)

    def save(self) -> None:
        """Write old and new entries atomically (nothing when nothing is new)."""
        if not self._new:
            return
        keys = [key for key in self._index if key not in self._new]
        kept = np.array([self._index[key] for key in keys], dtype=np.int64)
        keys += list(self._new)
        stamps = np.concatenate([self._stamps[kept], np.array([v[:2] for v in self._new.values()], np.int64)])
        histograms = np.concatenate([self._histograms[kept], np.stack([v[2] for v in self._new.values()])])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, lambda stream: np.savez(
            stream, version=np.int64(CACHE_VERSION), keys=np.array(keys), stamps=stamps, histograms=histograms
        ))
