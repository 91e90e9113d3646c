"""`HistogramCache`: each pool sample's verdict (its label histogram, or why it is bad) kept between selection runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers.utils import logging

from ..atomic import write_atomically
from ..data import (
    BadSampleError,
    MissingMaskError,
    SampleRecord,
    SampleVerdict,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    file_stamp,
)
from ..data.image_files import STAMP_FIELDS

logger = logging.get_logger(__name__)

CACHE_FILE = "class_stats.npz"
# 2: one entry per sample (image and label file), stamps with ctime and inode, bad samples' verdicts kept.
CACHE_VERSION = 2
# An entry holds the image's and the label's `file_stamp`.
STAMP_WIDTH = 2 * STAMP_FIELDS
# The verdicts a cached entry may hold; label values are checked against the run's label set, never cached.
CACHED_ERRORS = {cls.__name__: cls for cls in (MissingMaskError, UnreadableImageError, UnreadableMaskError,
                                               SizeMismatchError)}
_ARRAYS = ("version", "keys", "stamps", "histograms", "failed", "errors", "problems")


def sample_stamps(records: Sequence[SampleRecord], level: int | None) -> tuple[list[str], np.ndarray]:
    """Cache keys and stamps (image then label file, see `file_stamp`) of records; -1 where a file cannot be read."""
    keys, stamps = [], np.full((len(records), STAMP_WIDTH), -1, dtype=np.int64)
    for i, record in enumerate(records):
        image, label_path = os.path.abspath(record.image_path), record.label_path
        if label_path is None:
            keys.append(f"none:{image}")
            continue
        label = os.path.abspath(label_path)
        # A polygon file gives a different map at each IDD level.
        keys.append(f"{image}|{label}#level{level}" if label_path.endswith(".json") else f"{image}|{label}")
        try:
            stamps[i] = file_stamp(record.image_path) + file_stamp(label_path)
        except OSError:
            continue
    return keys, stamps


class HistogramCache:
    """Sample verdicts keyed by (image, label) path and both files' stamps, stored as one ``.npz`` file.

    A good sample's entry is its label histogram, a bad one's the error and problem (a corrupt image, a size
    mismatch), so a rerun reads no image and decodes no label map. Entries of samples not seen in a run are kept,
    so switching between datasets, levels or ``--max_samples`` reuses them; a file whose stamp changed is checked
    again. A cache that cannot be read (truncated, foreign, another version) is rebuilt after one warning.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._index: dict[str, int] = {}
        self._stamps = np.zeros((0, STAMP_WIDTH), dtype=np.int64)
        self.histograms = np.zeros((0, 256), dtype=np.int64)
        self._failures: dict[int, tuple[type[BadSampleError], str]] = {}
        self._new: dict[str, tuple[tuple[int, ...], SampleVerdict]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            stored = np.load(self.path, allow_pickle=False)
            if not isinstance(stored, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz file")
            with stored:
                if set(stored.files) != set(_ARRAYS):
                    raise ValueError(f"holds {sorted(stored.files)}, not a histogram cache")
                arrays = {name: stored[name] for name in _ARRAYS}
            if int(arrays["version"]) != CACHE_VERSION:
                raise ValueError(f"cache format {int(arrays['version'])}, not {CACHE_VERSION}")
            keys, stamps, histograms = arrays["keys"], arrays["stamps"], arrays["histograms"]
            failed, errors, problems = arrays["failed"], arrays["errors"], arrays["problems"]
            count = len(keys)
            if not (keys.ndim == 1 and (count == 0 or keys.dtype.kind == "U")
                    and stamps.shape == (count, STAMP_WIDTH) and stamps.dtype == np.int64
                    and histograms.shape == (count, 256) and histograms.dtype == np.int64
                    and failed.ndim == 1 and failed.dtype == np.int64 and errors.shape == problems.shape == failed.shape
                    and (failed.size == 0 or (errors.dtype.kind == problems.dtype.kind == "U"
                                              and failed.min() >= 0 and failed.max() < count))
                    and (count == 0 or histograms.min() >= 0)):
                raise ValueError("arrays of the wrong shape or type")
            failures = {}
            for position, error, problem in zip(failed.tolist(), errors.tolist(), problems.tolist(), strict=True):
                if error not in CACHED_ERRORS:
                    raise ValueError(f"unknown verdict {error!r}")
                failures[position] = (CACHED_ERRORS[error], problem)
        except Exception as err:  # a zip, format or content error all mean the same: decode again
            logger.warning(f"{self.path}: unreadable histogram cache ({type(err).__name__}: {err}); rebuilding it")
            return
        self._index = {key: i for i, key in enumerate(keys.tolist())}
        self._stamps = stamps
        self.histograms = histograms
        self._failures = failures

    def lookup(self, keys: Sequence[str], stamps: np.ndarray) -> np.ndarray:
        """For (key, stamp) pairs: each fresh entry's position (-1 where missing or stale)."""
        positions = np.array([self._index.get(key, -1) for key in keys], dtype=np.int64)
        hit = positions >= 0
        hit[hit] = (self._stamps[positions[hit]] == stamps[hit]).all(axis=1)
        positions[~hit] = -1
        return positions

    def verdict(self, position: int, name: str) -> SampleVerdict:
        """The stored verdict at ``position`` (from `lookup`) for the sample called ``name``."""
        if position in self._failures:
            error, problem = self._failures[position]
            return SampleVerdict(name, error, problem)
        return SampleVerdict(name, histogram=self.histograms[position])

    def add(self, key: str, stamp: Sequence[int], verdict: SampleVerdict) -> None:
        """Remember a fresh verdict (written by `save`): a histogram, or an error this cache can hold."""
        if verdict.error is None or verdict.error.__name__ in CACHED_ERRORS:
            self._new[key] = (tuple(int(v) for v in stamp), verdict)

    def save(self) -> None:
        """Write old and new entries atomically (nothing when nothing is new)."""
        if not self._new:
            return
        keys = [key for key in self._index if key not in self._new]
        kept = np.array([self._index[key] for key in keys], dtype=np.int64)
        failures = [(i, *self._failures[p]) for i, p in enumerate(kept.tolist()) if p in self._failures]
        new = list(self._new.values())
        failures += [(len(keys) + i, v.error, v.problem) for i, (_, v) in enumerate(new) if v.error is not None]
        keys += list(self._new)
        stamps = np.concatenate([self._stamps[kept], np.array([s for s, _ in new], np.int64).reshape(-1, STAMP_WIDTH)])
        fresh = [v.histogram if v.error is None else np.zeros(256, np.int64) for _, v in new]
        histograms = np.concatenate([self.histograms[kept], np.stack(fresh).astype(np.int64)])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, lambda stream: np.savez(
            stream, version=np.int64(CACHE_VERSION), keys=np.array(keys, dtype=str), stamps=stamps,
            histograms=histograms, failed=np.array([f[0] for f in failures], dtype=np.int64),
            errors=np.array([f[1].__name__ for f in failures], dtype=str),
            problems=np.array([f[2] for f in failures], dtype=str),
        ))
