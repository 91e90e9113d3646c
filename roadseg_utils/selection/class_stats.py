"""Per-image class statistics: every pool sample checked (image header, mask, sizes) and its label histogram counted.

Verdicts are kept in the shared label cache (`roadseg_utils.data.label_cache`) and computed in parallel; a bad
sample is never ranked.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from transformers.utils import logging

from ..data import (
    LabelValueError,
    MissingMaskError,
    SampleVerdict,
    check_on_bad_sample,
    label_value_problem,
    sort_samples,
)
from ..data.label_cache import (
    CHECK_CHUNK,
    NO_STAMP,
    Decoder,
    check_records,
    check_with_cache,
    decode_in_chunks,
)
from ..labels import IGNORE_INDEX, LabelSet, pixel_counts
from ..parallel import resolve_workers
from .pool import CandidatePool

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)

# Dataset rows per worker task (see `label_cache.CHECK_CHUNK`).
HISTOGRAM_CHUNK = CHECK_CHUNK


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


def _dataset_decoder(pool: CandidatePool, workers: int, progress: bool) -> Decoder:
    """The `Decoder` of dataset rows: histograms counted over contiguous ranges of the sorted table."""
    def decode(todo: np.ndarray) -> Iterator[tuple[int, SampleVerdict, tuple[int, ...] | None]]:
        chunks = list(_contiguous_runs(todo, HISTOGRAM_CHUNK))
        tasks = [(int(chunk[0]), int(chunk[-1]) + 1) for chunk in chunks]
        if workers > 1:  # workers inherit the dataset by fork
            return decode_in_chunks(_dataset_histograms, chunks, tasks, workers, progress, _set_worker_dataset,
                                    (pool.dataset,))
        return decode_in_chunks(_DatasetHistogramTask(pool.dataset), chunks, tasks, workers, progress)
    return decode


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

    A file sample is checked as validation checks it (`label_cache.check_sample_files`: the image's header, the mask
    decoded, their sizes equal) and its values against ``label_set``; dataset rows were checked when loaded. The
    verdicts go to the shared label cache at ``cache_path``. Memory holds the histograms, not the maps. A bad sample
    raises its `BadSampleError` naming the file (found early: checking stops at the first one), or with
    ``on_bad_sample="skip"`` is logged and left out; it is never ranked.
    """
    check_on_bad_sample(on_bad_sample)
    value_failures = functools.partial(_label_value_failures, pool, label_set=label_set)
    if pool.records is not None:
        checked = check_records(pool.records, label_set, value_failures, cache_path, num_workers, on_bad_sample,
                                progress)
    else:
        keys = [f"dataset:{pool.dataset._fingerprint}:{path}" for path in pool.paths]
        # The dataset fingerprint in the key stands for the content, so the stamp is a constant.
        stamps = np.tile(np.array(NO_STAMP, dtype=np.int64), (len(pool), 1))
        decode = _dataset_decoder(pool, resolve_workers(num_workers, len(pool)), progress)
        checked = check_with_cache(keys, stamps, pool.paths, decode, value_failures, cache_path, on_bad_sample)
    if not checked.failures:
        return ClassStats(pool, checked.histograms, [], checked.decoded)
    good = SampleVerdict("")
    keep, _, skipped = sort_samples(
        (checked.failures.get(index, good) for index in range(len(pool))), on_bad_sample, pool.source
    )
    return ClassStats(pool.subset(keep), checked.histograms[keep], skipped, checked.decoded)


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
