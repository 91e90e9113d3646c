"""Per-image class statistics: every pool sample checked (image header, mask, sizes) and its label histogram counted.

Verdicts are cached by file stamps and computed in parallel; a bad sample is never ranked.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm import tqdm
from transformers.utils import logging

from ..data import (
    BadSampleError,
    LabelValueError,
    MissingMaskError,
    SampleVerdict,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    check_on_bad_sample,
    file_stamp,
    label_level,
    label_value_problem,
    read_label_map,
    sort_samples,
    to_label_map,
)
from ..data.decoding import image_size
from ..labels import IGNORE_INDEX, LabelSet, pixel_counts
from ..parallel import map_in_order, resolve_workers
from .histogram_cache import STAMP_WIDTH, HistogramCache, sample_stamps
from .pool import CandidatePool

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Label maps per worker task: large enough to amortise inter-process traffic, small enough for a smooth progress bar.
HISTOGRAM_CHUNK = 16
# A sample's stamp (image and label file) where there is nothing to stamp: dataset rows, keyed by fingerprint.
NO_STAMP = (0,) * STAMP_WIDTH


def _is_gray8_png(data: bytes) -> bool:
    # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25 (0 = greyscale).
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x00"


def _read_regular_file(path: str) -> bytes:
    # O_NONBLOCK: opening a FIFO named like a mask returns at once, and fstat refuses it instead of blocking on it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file (a FIFO, socket, device or folder)")
        return handle.read()


def label_map_counts(label_path: str | os.PathLike[str], level: int | None = 3) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixel count of every value 0-255 of one label map, and its (height, width).

    8-bit greyscale PNGs (IDD's label maps) are decoded by OpenCV, which is faster than PIL (see BENCHMARKS.md);
    anything else goes through the data layer's `to_label_map` and its checks (palette indices kept, lossy
    formats refused). A polygon JSON is rasterised at IDD ``level`` first.
    """
    path = os.fspath(label_path)
    if path.endswith(".json"):
        label = read_label_map(path, level)
        return pixel_counts(label), label.shape
    data = _read_regular_file(path)
    if _is_gray8_png(data):
        label = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise ValueError("not a decodable PNG")
        if label.ndim == 2 and label.dtype == np.uint8:
            return pixel_counts(label), label.shape
    label = to_label_map(data, level, path)
    return pixel_counts(label), label.shape


def _is_transient(err: Exception) -> bool:
    # An error the operating system reports (EIO, EACCES, ...) may pass; a file that fails to decode stays bad.
    return isinstance(err, OSError) and err.errno is not None


def _check_files(image_path: str, label_path: str, level: int | None) -> tuple[SampleVerdict, bool]:
    """One sample's verdict (image header, mask decoded, sizes equal) and whether it may be cached."""
    try:
        height, width = image_size(image_path, image_path)
    except Exception as err:  # any failure to read the image's header makes the sample unusable
        problem = err.problem if isinstance(err, BadSampleError) else f"cannot read image ({err})"
        return SampleVerdict(image_path, UnreadableImageError, problem), not _is_transient(err)
    try:
        histogram, shape = label_map_counts(label_path, level)
    except FileNotFoundError:
        return SampleVerdict(image_path, MissingMaskError, f"mask {label_path} does not exist"), False
    except Exception as err:  # any failure to decode the mask makes the sample unusable
        detail = err.problem if isinstance(err, BadSampleError) else err
        verdict = SampleVerdict(image_path, UnreadableMaskError, f"cannot read mask {label_path} ({detail})")
        return verdict, not _is_transient(err)
    if shape != (height, width):
        problem = f"mask {label_path} is {shape[0]}x{shape[1]} but image is {height}x{width}"
        return SampleVerdict(image_path, SizeMismatchError, problem), True
    return SampleVerdict(image_path, histogram=histogram, height=height, width=width), True


def _file_verdicts(
    tasks: list[tuple[str, str | None]], level: int | None
) -> list[tuple[SampleVerdict, tuple[int, ...] | None]]:
    """Each sample's verdict, with the stamp to cache it under (None: not cacheable)."""
    outcomes: list[tuple[SampleVerdict, tuple[int, ...] | None]] = []
    for image_path, label_path in tasks:
        if label_path is None:
            outcomes.append((SampleVerdict(image_path, MissingMaskError, "has no mask"), None))
            continue
        try:
            before = file_stamp(image_path) + file_stamp(label_path)
        except OSError:
            before = None
        verdict, cacheable = _check_files(image_path, label_path, level)
        try:
            after = file_stamp(image_path) + file_stamp(label_path)
        except OSError:
            after = None
        # Stamped before and after reading: a file replaced meanwhile is not cached under either stamp.
        outcomes.append((verdict, before if cacheable and before == after else None))
    return outcomes


_WORKER_DATASET: datasets.Dataset | None = None


def _set_worker_dataset(dataset: datasets.Dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _dataset_histograms(
    bounds: tuple[int, int], dataset: datasets.Dataset | None = None
) -> list[tuple[SampleVerdict, tuple[int, ...] | None]]:
    # The data layer validated the rows (image, mask, sizes) when it loaded them; only histograms are left to count.
    start, stop = bounds
    rows = (dataset if dataset is not None else _WORKER_DATASET).select_columns(["label", "path"])[start:stop]
    return [
        (SampleVerdict(path, MissingMaskError, "has no mask"), None) if label is None
        else (SampleVerdict(path, histogram=pixel_counts(label)), NO_STAMP)
        for label, path in zip(rows["label"], rows["path"], strict=True)
    ]


@dataclass(frozen=True, eq=False)
class ClassStats:
    """The usable pool images and the (N, 256) int64 pixel count of every label value of each."""

    pool: CandidatePool
    histograms: np.ndarray
    skipped: list[tuple[str, str]]
    decoded: int  # samples checked (label map decoded) by this call; the others came from the cache


def _decode_histograms(
    pool: CandidatePool, todo: np.ndarray, level: int | None, workers: int, progress: bool
) -> Iterator[tuple[int, SampleVerdict, tuple[int, ...] | None]]:
    """(pool index, verdict, stamp to cache it under) for every index in ``todo``, checked in chunks by
    ``workers`` processes."""
    if pool.records is not None:
        chunks = [todo[i: i + HISTOGRAM_CHUNK] for i in range(0, todo.size, HISTOGRAM_CHUNK)]
        tasks: list[Any] = [[(pool.records[i].image_path, pool.records[i].label_path) for i in c] for c in chunks]
        fn: Callable[[Any], list[tuple[SampleVerdict, tuple[int, ...] | None]]] = _FileHistogramTask(level)
        initializer, initargs = None, ()
    else:
        # Dataset rows are fetched by contiguous ranges of the sorted table; workers inherit the dataset by fork.
        chunks = list(_contiguous_runs(todo, HISTOGRAM_CHUNK))
        tasks = [(int(chunk[0]), int(chunk[-1]) + 1) for chunk in chunks]
        if workers > 1:
            fn, initializer, initargs = _dataset_histograms, _set_worker_dataset, (pool.dataset,)
        else:
            fn, initializer, initargs = _DatasetHistogramTask(pool.dataset), None, ()
    with tqdm(total=int(todo.size), unit="map", desc="label histograms", disable=not progress or None) as bar, \
            closing(map_in_order(fn, tasks, workers, initializer, initargs)) as results:
        for chunk, outcomes in zip(chunks, results, strict=True):
            for index, (verdict, stamp) in zip(chunk.tolist(), outcomes, strict=True):
                yield index, verdict, stamp
            bar.update(len(chunk))


def _label_value_failures(
    pool: CandidatePool, histograms: np.ndarray, indices: np.ndarray, label_set: LabelSet
) -> dict[int, SampleVerdict]:
    """Verdicts of the samples among ``indices`` whose histogram holds values outside ``label_set``."""
    failures = {}
    outside = histograms[indices, label_set.num_labels:IGNORE_INDEX].any(axis=1)
    for index in indices[outside].tolist():
        if pool.records is not None:
            name, label_path = pool.records[index].image_path, pool.records[index].label_path
        else:
            name, label_path = pool.paths[index], None
        problem = label_value_problem(histograms[index], label_set, f"mask {label_path}" if label_path else "mask")
        failures[index] = SampleVerdict(name, LabelValueError, problem)
    return failures


def compute_class_stats(
    pool: CandidatePool,
    label_set: LabelSet,
    cache_path: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    on_bad_sample: str = "error",
    progress: bool = True,
) -> ClassStats:
    """Every pool sample checked and its label histogram counted: cached verdicts reused, the others in parallel.

    A file sample is checked as validation checks it: the image's header (a corrupt or truncated image), the mask
    decoded, their sizes equal, its values in ``label_set``; dataset rows were checked when loaded. Memory holds
    the histograms, not the maps. A bad sample raises its `BadSampleError` naming the file (found early: checking
    stops at the first one), or with ``on_bad_sample="skip"`` is logged and left out; it is never ranked.
    """
    check_on_bad_sample(on_bad_sample)
    level = label_level(label_set)
    if pool.records is not None:
        keys, stamps = sample_stamps(pool.records, level)
        names = [r.image_path for r in pool.records]
    else:
        keys = [f"dataset:{pool.dataset._fingerprint}:{path}" for path in pool.paths]
        # The dataset fingerprint in the key stands for the content, so the stamp is a constant.
        stamps = np.tile(np.array(NO_STAMP, dtype=np.int64), (len(pool), 1))
        names = pool.paths
    cache = HistogramCache(cache_path) if cache_path is not None else None
    histograms = np.zeros((len(pool), 256), dtype=np.int64)
    positions = cache.lookup(keys, stamps) if cache is not None else np.full(len(pool), -1, dtype=np.int64)
    known = np.flatnonzero(positions >= 0)
    failures: dict[int, SampleVerdict] = {}
    for index in known.tolist():
        verdict = cache.verdict(int(positions[index]), names[index])
        if verdict.error is not None:
            failures[index] = verdict
        else:
            histograms[index] = verdict.histogram
    failures.update(_label_value_failures(pool, histograms, known, label_set))
    todo = np.flatnonzero(positions < 0)
    if on_bad_sample == "error" and failures:
        todo = todo[todo < min(failures)]  # only a sample before the first known bad one can come first
    decoded = 0
    if todo.size:
        workers = resolve_workers(num_workers, todo.size)
        logger.info(f"checking {todo.size} samples ({known.size} cached) with {workers} process(es)")
        for index, verdict, stamp in _decode_histograms(pool, todo, level, workers, progress):
            decoded += 1
            if cache is not None and stamp is not None:
                cache.add(keys[index], stamp, verdict)
            if verdict.error is None:
                histograms[index] = verdict.histogram
                failures.update(_label_value_failures(pool, histograms, np.array([index]), label_set))
            else:
                failures[index] = verdict
            if on_bad_sample == "error" and index in failures:
                break  # every sample before this one is checked, so it is the first bad one
        if cache is not None:
            _save_cache(cache)
    if not failures:
        return ClassStats(pool, histograms, [], decoded)
    good = SampleVerdict("")
    keep, _, skipped = sort_samples(
        (failures.get(index, good) for index in range(len(pool))), on_bad_sample, pool.source
    )
    return ClassStats(pool.subset(keep), histograms[keep], skipped, decoded)


def _save_cache(cache: HistogramCache) -> None:
    # The cache only saves time: a full or read-only disk here is a warning, and the outputs report the real error.
    try:
        cache.save()
    except OSError as err:
        logger.warning(f"{cache.path}: cannot save the histogram cache ({err.strerror or err}); the next run checks "
                       "every sample again")


class _FileHistogramTask:
    """Picklable per-chunk task for worker processes."""

    def __init__(self, level: int | None) -> None:
        self.level = level

    def __call__(self, tasks: list[tuple[str, str | None]]) -> list[tuple[SampleVerdict, tuple[int, ...] | None]]:
        return _file_verdicts(tasks, self.level)


class _DatasetHistogramTask:
    """In-process per-range task over a dataset."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __call__(self, bounds: tuple[int, int]) -> list[tuple[SampleVerdict, tuple[int, ...] | None]]:
        return _dataset_histograms(bounds, self.dataset)


def _contiguous_runs(indices: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Split sorted indices into runs of consecutive values, each at most ``limit`` long."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    for run in np.split(indices, breaks):
        for start in range(0, run.size, limit):
            yield run[start: start + limit]
