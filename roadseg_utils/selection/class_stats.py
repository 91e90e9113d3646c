"""Per-image class statistics: the pixel histogram of every pool image's label map, cached and decoded in parallel."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm
from transformers.utils import logging

from ..data import (
    LabelValueError,
    MissingMaskError,
    SampleVerdict,
    UnreadableMaskError,
    check_on_bad_sample,
    label_level,
    label_value_problem,
    read_label_map,
    sort_samples,
    to_label_map,
)
from ..labels import IGNORE_INDEX, LabelSet, pixel_counts
from ..parallel import map_in_order, resolve_workers
from .histogram_cache import HistogramCache
from .pool import CandidatePool

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Label maps per worker task: large enough to amortise inter-process traffic, small enough for a smooth progress bar.
HISTOGRAM_CHUNK = 16


def _is_gray8_png(data: bytes) -> bool:
    # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25 (0 = greyscale).
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x00"


def label_histogram(label_path: str | os.PathLike[str], level: int | None = 3) -> np.ndarray:
    """Pixel count of every value 0-255 of one label map, decoded by the fastest reader that keeps its values.

    8-bit greyscale PNGs (IDD's label maps) are decoded by OpenCV, which is faster than PIL (see BENCHMARKS.md);
    palette and other images go through PIL, whose histogram counts the stored values (palette indices for P
    images). A polygon JSON is rasterised at IDD ``level`` first.
    """
    path = os.fspath(label_path)
    if path.endswith(".json"):
        return pixel_counts(read_label_map(path, level))
    data = Path(path).read_bytes()
    if _is_gray8_png(data):
        label = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise ValueError("not a decodable PNG")
        if label.ndim == 2 and label.dtype == np.uint8:
            return pixel_counts(label)
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("L", "P"):
            return np.asarray(image.histogram(), dtype=np.int64)
        return pixel_counts(to_label_map(image, level, path))


def _file_histograms(tasks: list[tuple[str, str | None]], level: int | None) -> list[SampleVerdict]:
    verdicts = []
    for image_path, label_path in tasks:
        if label_path is None:
            verdicts.append(SampleVerdict(image_path, MissingMaskError, "has no mask"))
            continue
        try:
            verdicts.append(SampleVerdict(image_path, histogram=label_histogram(label_path, level)))
        except FileNotFoundError:
            verdicts.append(SampleVerdict(image_path, MissingMaskError, f"mask {label_path} does not exist"))
        except Exception as err:  # any failure to decode the mask makes the sample unusable
            verdicts.append(SampleVerdict(image_path, UnreadableMaskError, f"cannot read mask {label_path} ({err})"))
    return verdicts


_WORKER_DATASET: datasets.Dataset | None = None


def _set_worker_dataset(dataset: datasets.Dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _dataset_histograms(bounds: tuple[int, int], dataset: datasets.Dataset | None = None) -> list[SampleVerdict]:
    start, stop = bounds
    rows = (dataset if dataset is not None else _WORKER_DATASET).select_columns(["label", "path"])[start:stop]
    return [
        SampleVerdict(path, MissingMaskError, "has no mask") if label is None
        else SampleVerdict(path, histogram=pixel_counts(label))
        for label, path in zip(rows["label"], rows["path"], strict=True)
    ]


def _file_stamps(pool: CandidatePool, level: int | None) -> tuple[list[str], np.ndarray]:
    """Cache keys and (size, mtime_ns) of each record's label file; (-1, -1) when it cannot be read."""
    keys, stamps = [], np.full((len(pool), 2), -1, dtype=np.int64)
    for i, record in enumerate(pool.records):
        label_path = record.label_path
        if label_path is None:
            keys.append(f"none:{record.image_path}")
            continue
        key = os.path.abspath(label_path)
        # A polygon file gives a different map at each IDD level.
        keys.append(f"{key}#level{level}" if label_path.endswith(".json") else key)
        try:
            info = os.stat(label_path)
        except OSError:
            continue
        stamps[i] = info.st_size, info.st_mtime_ns
    return keys, stamps


@dataclass(frozen=True, eq=False)
class ClassStats:
    """The usable pool images and the (N, 256) int64 pixel count of every label value of each."""

    pool: CandidatePool
    histograms: np.ndarray
    skipped: list[tuple[str, str]]
    decoded: int  # label maps decoded by this call; the others came from the cache


def _decode_histograms(
    pool: CandidatePool, todo: np.ndarray, level: int | None, workers: int, progress: bool
) -> Iterator[tuple[int, SampleVerdict]]:
    """(pool index, verdict) for every index in ``todo``, decoded in chunks by ``workers`` processes."""
    if pool.records is not None:
        chunks = [todo[i: i + HISTOGRAM_CHUNK] for i in range(0, todo.size, HISTOGRAM_CHUNK)]
        tasks: list[Any] = [[(pool.records[i].image_path, pool.records[i].label_path) for i in c] for c in chunks]
        fn: Callable[[Any], list[SampleVerdict]] = _FileHistogramTask(level)
        initializer, initargs = None, ()
    else:
        # Dataset rows are fetched by contiguous ranges of the sorted table; workers inherit the dataset by fork.
        chunks = list(_contiguous_runs(todo, HISTOGRAM_CHUNK))
        tasks = [(int(chunk[0]), int(chunk[-1]) + 1) for chunk in chunks]
        if workers > 1:
            fn, initializer, initargs = _dataset_histograms, _set_worker_dataset, (pool.dataset,)
        else:
            fn, initializer, initargs = _DatasetHistogramTask(pool.dataset), None, ()
    with tqdm(total=int(todo.size), unit="map", desc="label histograms", disable=not progress or None) as bar:
        for chunk, outcomes in zip(chunks, map_in_order(fn, tasks, workers, initializer, initargs), strict=True):
            yield from zip(chunk.tolist(), outcomes, strict=True)
            bar.update(len(chunk))


def compute_class_stats(
    pool: CandidatePool,
    label_set: LabelSet,
    cache_path: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    on_bad_sample: str = "error",
    progress: bool = True,
) -> ClassStats:
    """Pixel histograms of every pool image's label map: cached ones reused, the others decoded in parallel.

    Only label maps are read (never the images); memory holds the histograms, not the maps. A mask that is
    missing, unreadable or holds values outside ``label_set`` raises its `BadSampleError` naming the file, or with
    ``on_bad_sample="skip"`` is logged and left out.
    """
    check_on_bad_sample(on_bad_sample)
    level = label_level(label_set)
    if pool.records is not None:
        keys, stamps = _file_stamps(pool, level)
    else:
        keys = [f"dataset:{pool.dataset._fingerprint}:{path}" for path in pool.paths]
        # The dataset fingerprint in the key stands for the content, so the stamp is a constant.
        stamps = np.zeros((len(pool), 2), dtype=np.int64)
    cache = HistogramCache(cache_path) if cache_path is not None else None
    histograms = np.zeros((len(pool), 256), dtype=np.int64)
    known = np.zeros(len(pool), dtype=bool)
    if cache is not None:
        known, cached = cache.lookup(keys, stamps)
        histograms[known] = cached
    todo = np.flatnonzero(~known)
    failures: dict[int, SampleVerdict] = {}
    if todo.size:
        workers = resolve_workers(num_workers, todo.size)
        logger.info(f"decoding {todo.size} label maps ({len(pool) - todo.size} cached) with {workers} process(es)")
        for index, verdict in _decode_histograms(pool, todo, level, workers, progress):
            if verdict.error is not None:
                failures[index] = verdict
                continue
            histograms[index] = verdict.histogram
            if cache is not None and stamps[index, 0] >= 0:
                cache.add(keys[index], stamps[index], verdict.histogram)
        if cache is not None:
            cache.save()
    names = [r.image_path for r in pool.records] if pool.records is not None else pool.paths
    for index in np.flatnonzero(histograms[:, label_set.num_labels:IGNORE_INDEX].any(axis=1)).tolist():
        if index not in failures:
            label_path = pool.records[index].label_path if pool.records is not None else None
            problem = label_value_problem(histograms[index], label_set, f"mask {label_path}" if label_path else "mask")
            failures[index] = SampleVerdict(names[index], LabelValueError, problem)
    if not failures:
        return ClassStats(pool, histograms, [], int(todo.size))
    good = SampleVerdict("")
    keep, _, skipped = sort_samples(
        (failures.get(index, good) for index in range(len(pool))), on_bad_sample, pool.source
    )
    return ClassStats(pool.subset(keep), histograms[keep], skipped, int(todo.size))


class _FileHistogramTask:
    """Picklable per-chunk task for worker processes."""

    def __init__(self, level: int | None) -> None:
        self.level = level

    def __call__(self, tasks: list[tuple[str, str | None]]) -> list[SampleVerdict]:
        return _file_histograms(tasks, self.level)


class _DatasetHistogramTask:
    """In-process per-range task over a dataset."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __call__(self, bounds: tuple[int, int]) -> list[SampleVerdict]:
        return _dataset_histograms(bounds, self.dataset)


def _contiguous_runs(indices: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Split sorted indices into runs of consecutive values, each at most ``limit`` long."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    for run in np.split(indices, breaks):
        for start in range(0, run.size, limit):
            yield run[start: start + limit]
