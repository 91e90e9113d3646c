"""Choosing the most informative training images: per-image class statistics, scores, strategies, manifest I/O.

Selection ranks the *training pool* of a data source: the images of its train split as found (an IDD tree's
``leftImg8bit/train``, every image of flat folders, a Hugging Face dataset's train split). Validation and test are
never ranked and never filtered. Each image gets three scores from the pixel histogram of its label map:

- CDS, class diversity: the Shannon entropy in nats of its class pixel distribution (``entropy``), or the number
  of classes present (``count``); a class is present with at least ``min_pixels`` pixels.
- RCS, rare-class score: the number of present classes of the rare set (``count``), or the sum over present
  classes of ``-ln f_c``, where ``f_c`` is the share of pool images containing class c (``neglog``).
- ICS: the inverse of the number of pool images in the image's sequence folder (``inverse``), or that number
  (``count``).

The seed's score is ``count`` / ``neglog`` / ``count``. The defaults differ because the seed's score is not
rare-seeking: summing ``-ln f_c`` over every present class rewards clutter (many mid-frequency classes) over one
rare class, and counting classes and sequence sizes pushes the same way, so classes that come with sparse scenes
(guard rails on highways) end up under-represented, below a random subset of the same size.

``score = alpha * cds / max(cds) + beta * rcs / max(rcs) + gamma * ics / max(ics)`` (a term whose maximum is 0 is
0). The manifest (DESIGN.md) holds one row per pool image; ``selected_paths(manifest)`` gives the ``path`` ids of the
chosen rows, the same ids as the dataset's ``path`` column (`SampleRecord.path`: relative to the data root), so
``run_finetune.py --selection_manifest`` keeps exactly those rows of its train split.

Histograms are cached in ``class_stats.npz`` keyed by (label file, size, modification time), so a rerun with other
weights or another budget decodes no label map.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm
from transformers.utils import logging

from . import hub
from .atomic import write_atomically, write_text_atomically
from .data import (
    DataError,
    DataSourceArguments,
    EmptyDatasetError,
    LabelValueError,
    MissingMaskError,
    SampleRecord,
    SampleVerdict,
    UnreadableMaskError,
    check_on_bad_sample,
    dataset_column,
    find_records,
    idd_frame_name,
    label_level,
    label_value_problem,
    load_segmentation_dataset,
    paths_fingerprint,
    read_label_map,
    sort_samples,
    to_label_map,
)
from .labels import IGNORE_INDEX, LabelSet, pixel_counts
from .parallel import map_in_order, resolve_workers

if TYPE_CHECKING:
    # Imported where used: `datasets` takes ~0.6 s to import, and file layouts never need it.
    import datasets

logger = logging.get_logger(__name__)

STRATEGIES = ("weighted", "random", "rare_class_sampling")
CDS_MODES = ("count", "entropy")
RCS_MODES = ("neglog", "count")
ICS_MODES = ("count", "inverse")
MATERIALIZE_MODES = ("none", "symlink", "copy", "hf_dataset")
DEFAULT_NUM_IMAGES = 1500
FORMULA = "score = alpha * cds / max(cds) + beta * rcs / max(rcs) + gamma * ics / max(ics)"
MANIFEST_FORMAT = "roadseg-selection-manifest"
MANIFEST_VERSION = 1
MANIFEST_COLUMNS = ("path", "sequence", "cds", "rcs", "ics", "score", "rank", "selected")
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
REPORT_FILE = "report.md"
CACHE_FILE = "class_stats.npz"
CACHE_VERSION = 1
SUBSET_MARKER = ".roadseg_subset"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Label maps per worker task: large enough to amortise inter-process traffic, small enough for a smooth progress bar.
HISTOGRAM_CHUNK = 16
# Seed offsets, so each strategy draws from its own stream of the same seed.
RANDOM_SALT = 1
RARE_CLASS_SALT = 2
SUBSAMPLE_SALT = 3
# Classes drawn per batch by rare-class sampling; the draw is redone when a class runs out of images.
CLASS_DRAW_BATCH = 256


class SelectionError(DataError):
    """A selection option is invalid or does not fit the data (scripts print it as one line)."""


def _check_weights(alpha: float, beta: float, gamma: float) -> None:
    values = {"alpha": alpha, "beta": beta, "gamma": gamma}
    bad = [f"{name}={value}" for name, value in values.items() if not (np.isfinite(value) and value >= 0)]
    if bad:
        raise SelectionError(f"weights must be finite and >= 0, got {', '.join(bad)}")
    if alpha == beta == gamma == 0:
        raise SelectionError("alpha, beta and gamma are all 0: at least one weight must be positive")


@dataclass
class SelectionArguments:
    """How run_selection.py scores, picks and writes the subset of the training pool."""

    output_dir: str = field(
        metadata={"help": "Folder for manifest.json/.csv, report.md, the plots and the class-statistics cache."}
    )
    num_images: int | None = field(
        default=None,
        metadata={"help": f"Budget K: images to keep from the training pool (default {DEFAULT_NUM_IMAGES}). "
                  "Asking for more than the pool holds is an error."},
    )
    fraction: float | None = field(
        default=None, metadata={"help": "Budget as a share of the training pool (0 < f <= 1), instead of --num_images."}
    )
    strategy: str = field(
        default="weighted",
        metadata={"help": "weighted: top K by the weighted score (ties: path ascending); random: K images drawn "
                  "uniformly; rare_class_sampling: draw a class with probability proportional to "
                  "exp((1 - f_c) / T), then an unpicked image containing it, until K are picked. "
                  "report.md compares all three at the same K.",
                  "choices": list(STRATEGIES)},
    )
    alpha: float = field(default=0.4, metadata={"help": "Weight of CDS (class diversity), >= 0."})
    beta: float = field(default=0.4, metadata={"help": "Weight of RCS (rare-class score), >= 0."})
    gamma: float = field(default=0.2, metadata={"help": "Weight of ICS (sequence size), >= 0."})
    cds_mode: str = field(
        default="entropy",
        metadata={"help": "CDS: 'entropy' = Shannon entropy (nats) of the image's class pixel distribution; "
                  "'count' = classes present with >= --min_pixels pixels (the seed's).", "choices": list(CDS_MODES)},
    )
    rcs_mode: str = field(
        default="count",
        metadata={"help": "RCS: 'count' = present classes from the rare set; 'neglog' = sum over present classes "
                  "of -ln(share of pool images with the class) (the seed's).", "choices": list(RCS_MODES)},
    )
    ics_mode: str = field(
        default="inverse",
        metadata={"help": "ICS: 'inverse' = 1 / pool images in the image's sequence folder, spreading the budget "
                  "over sequences; 'count' = that number (the seed's, favours long sequences). The seed's score "
                  "is --cds_mode count --rcs_mode neglog --ics_mode count.", "choices": list(ICS_MODES)},
    )
    min_pixels: int = field(default=1, metadata={"help": "Pixels a class needs in an image to count as present."})
    rare_threshold: float = field(
        default=0.1, metadata={"help": "Automatic rare set: classes in fewer than this share of pool images."}
    )
    rare_classes: list[str] | None = field(
        default=None,
        metadata={"help": "Name the rare set instead (class names or ids, e.g. --rare_classes bus 'traffic light')."},
    )
    temperature: float = field(default=0.01, metadata={"help": "T of rare_class_sampling (> 0)."})
    seed: int = field(default=0, metadata={"help": "Seed of random and rare_class_sampling and of --max_samples."})
    cache_dir: str | None = field(
        default=None, metadata={"help": f"Folder of the {CACHE_FILE} histogram cache (default: --output_dir)."}
    )
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (--no_plots to skip)."})
    materialize: str = field(
        default="none",
        metadata={"help": "Write the subset: 'symlink'/'copy' mirror the source tree (IDD: leftImg8bit/ and every "
                  "gtFine/ file of the frame), 'hf_dataset' a datasets folder (save_to_disk).",
                  "choices": list(MATERIALIZE_MODES)},
    )
    materialize_dir: str | None = field(
        default=None, metadata={"help": "Where --materialize writes (default: <output_dir>/subset)."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Publish the hf_dataset subset to --hub_dataset_id (implies hf_dataset)."}
    )
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repository, e.g. user/idd-1500."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub dataset as private."})

    def __post_init__(self) -> None:
        for name, allowed in (("strategy", STRATEGIES), ("cds_mode", CDS_MODES), ("rcs_mode", RCS_MODES),
                              ("ics_mode", ICS_MODES), ("materialize", MATERIALIZE_MODES)):
            if getattr(self, name) not in allowed:
                raise SelectionError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        _check_weights(self.alpha, self.beta, self.gamma)
        if self.num_images is not None and self.fraction is not None:
            raise SelectionError("give --num_images or --fraction, not both")
        if self.num_images is not None and self.num_images < 1:
            raise SelectionError(f"num_images must be at least 1, got {self.num_images}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SelectionError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_pixels < 1:
            raise SelectionError(f"min_pixels must be at least 1, got {self.min_pixels}")
        if not 0 < self.rare_threshold <= 1:
            raise SelectionError(f"rare_threshold must be in (0, 1], got {self.rare_threshold}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise SelectionError(f"temperature must be > 0, got {self.temperature}")
        if self.push_to_hub:
            if not self.hub_dataset_id:
                raise SelectionError("--push_to_hub needs --hub_dataset_id (e.g. user/idd-subset)")
            if self.materialize in ("symlink", "copy"):
                raise SelectionError("--push_to_hub publishes an hf_dataset subset; use --materialize hf_dataset")
            self.materialize = "hf_dataset"


# ---------------------------------------------------------------------------------------------------------
# The training pool


@dataclass(frozen=True, eq=False)
class CandidatePool:
    """The images selection ranks, in ``path`` order: records of a file layout, or rows of a dataset."""

    paths: list[str]
    sequences: list[str]
    source: str
    records: list[SampleRecord] | None = None
    dataset: datasets.Dataset | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> CandidatePool:
        """The pool restricted to ``indices`` (kept in the given order)."""
        return CandidatePool(
            paths=[self.paths[i] for i in indices],
            sequences=[self.sequences[i] for i in indices],
            source=self.source,
            records=[self.records[i] for i in indices] if self.records is not None else None,
            dataset=self.dataset.select(indices) if self.dataset is not None else None,
        )


def load_candidate_pool(data_args: DataSourceArguments, label_set: LabelSet, seed: int = 0) -> CandidatePool:
    """The training pool of any supported layout, sorted by ``path``, without decoding any image or label map.

    File layouts: the train folder's records (an IDD tree's val/test folders are left out; flat folders are all
    train). Hugging Face datasets and pickles: their train split as loaded, nothing carved out. ``--max_samples``
    keeps a seeded subset.
    """
    source = data_args.describe_source()
    kind = data_args.source_kind()
    if kind in ("idd", "flat"):
        records = [r for r in find_records(data_args, label_set) if (r.split or "train") == "train"]
        if not records:
            raise EmptyDatasetError(f"{source}: no annotated training images to rank")
        records = _subsample(records, data_args.max_samples, seed)
        return CandidatePool([r.path for r in records], [r.sequence for r in records], source, records=records)
    pool_args = replace(data_args, train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    dataset = load_segmentation_dataset(pool_args, label_set, seed)["train"]
    if len(dataset) == 0:
        raise EmptyDatasetError(f"{source}: the train split is empty, nothing to rank")
    paths = [str(p) for p in dataset_column(dataset, "path")]
    if len(set(paths)) != len(paths):
        raise DataError(f"{source}: the path column holds duplicates, so rows cannot be told apart in a manifest")
    order = sorted(range(len(paths)), key=paths.__getitem__)
    if order != list(range(len(paths))):
        dataset = dataset.select(order)
    sequences = [str(s) for s in dataset_column(dataset, "sequence")]
    return CandidatePool([paths[i] for i in order], sequences, source, dataset=dataset)


def _subsample(records: list[SampleRecord], max_samples: int | None, seed: int) -> list[SampleRecord]:
    if max_samples is None or len(records) <= max_samples:
        return records
    rng = np.random.default_rng((seed, SUBSAMPLE_SALT))
    keep = np.sort(rng.choice(len(records), max_samples, replace=False))
    return [records[i] for i in keep]


# ---------------------------------------------------------------------------------------------------------
# Per-image class statistics


def _is_gray8_png(data: bytes) -> bool:
    # IHDR is always the first chunk: bit depth at byte 24, colour type at byte 25 (0 = greyscale).
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x00"


def label_histogram(label_path: str | os.PathLike[str], level: int | None = 3) -> np.ndarray:
    """Pixel count of every value 0-255 of one label map, decoded by the fastest reader that keeps its values.

    8-bit greyscale PNGs (IDD's label maps) are decoded by OpenCV (~8 ms for 1080x1920 against PIL's ~10); palette
    and other images go through PIL, whose histogram counts the stored values (palette indices for P images). A
    polygon JSON is rasterised at IDD ``level`` first.
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


# ---------------------------------------------------------------------------------------------------------
# Scores


def class_presence(histograms: np.ndarray, num_labels: int, min_pixels: int = 1) -> np.ndarray:
    """(N, num_labels) bool: whether each class has at least ``min_pixels`` pixels in each image."""
    return histograms[:, :num_labels] >= min_pixels


def image_frequency(presence: np.ndarray) -> np.ndarray:
    """Share of images containing each class."""
    return presence.mean(axis=0) if len(presence) else np.zeros(presence.shape[1])


def class_diversity(histograms: np.ndarray, num_labels: int, min_pixels: int = 1, mode: str = "count") -> np.ndarray:
    """CDS per image: present classes (``count``) or the entropy in nats of the present classes' pixel shares."""
    presence = class_presence(histograms, num_labels, min_pixels)
    if mode == "count":
        return presence.sum(axis=1).astype(np.float64)
    if mode != "entropy":
        raise SelectionError(f"cds_mode must be one of {', '.join(CDS_MODES)}, got {mode!r}")
    counts = np.where(presence, histograms[:, :num_labels], 0).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log(shares, out=np.zeros_like(shares), where=shares > 0)
    return -(shares * logs).sum(axis=1) + 0.0


def rare_class_score(
    presence: np.ndarray, frequency: np.ndarray, mode: str = "neglog", rare_ids: Sequence[int] = ()
) -> np.ndarray:
    """RCS per image: sum of ``-ln f_c`` over present classes (``neglog``), or present rare classes (``count``)."""
    if mode == "neglog":
        rarity = -np.log(frequency, out=np.zeros(frequency.shape), where=frequency > 0) + 0.0
        return presence @ rarity
    if mode != "count":
        raise SelectionError(f"rcs_mode must be one of {', '.join(RCS_MODES)}, got {mode!r}")
    return presence[:, list(rare_ids)].sum(axis=1).astype(np.float64)


def sequence_score(sequences: Sequence[str], mode: str = "count") -> np.ndarray:
    """ICS per image: images in its sequence (``count``) or the inverse of that (``inverse``)."""
    _, inverse, counts = np.unique(np.asarray(sequences, dtype=object).astype(str), return_inverse=True,
                                   return_counts=True)
    sizes = counts[inverse].astype(np.float64)
    if mode == "count":
        return sizes
    if mode != "inverse":
        raise SelectionError(f"ics_mode must be one of {', '.join(ICS_MODES)}, got {mode!r}")
    return 1.0 / sizes


def _normalised(values: np.ndarray) -> np.ndarray:
    top = values.max() if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def weighted_score(
    cds: np.ndarray, rcs: np.ndarray, ics: np.ndarray, alpha: float = 0.4, beta: float = 0.4, gamma: float = 0.2
) -> np.ndarray:
    """``alpha * cds / max(cds) + beta * rcs / max(rcs) + gamma * ics / max(ics)``; a zero maximum gives 0."""
    _check_weights(alpha, beta, gamma)
    return alpha * _normalised(cds) + beta * _normalised(rcs) + gamma * _normalised(ics)


def resolve_budget(num_candidates: int, num_images: int | None = None, fraction: float | None = None,
                   source: str = "the dataset") -> int:
    """K from ``num_images`` (default 1500) or ``fraction`` of the pool; more than the pool holds is an error."""
    if num_images is not None and fraction is not None:
        raise SelectionError("give --num_images or --fraction, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise SelectionError(f"fraction must be in (0, 1], got {fraction}")
        return max(1, int(np.floor(fraction * num_candidates + 0.5)))
    budget = DEFAULT_NUM_IMAGES if num_images is None else num_images
    if budget < 1:
        raise SelectionError(f"num_images must be at least 1, got {budget}")
    if budget > num_candidates:
        raise SelectionError(
            f"asked for {budget} images but the dataset has {num_candidates} (training pool of {source}); "
            "lower --num_images or use --fraction"
        )
    return budget


def resolve_rare_classes(
    frequency: np.ndarray, label_set: LabelSet, named: Sequence[str] | None = None, threshold: float = 0.1
) -> list[int]:
    """Rare class ids: those ``named`` (names or ids), or the present classes in fewer than ``threshold`` of images."""
    if not named:
        return [int(c) for c in np.flatnonzero((frequency > 0) & (frequency < threshold))]
    by_name = {name.lower(): idx for idx, name in label_set.id2label.items()}
    chosen = []
    for item in named:
        text = str(item).strip()
        if text.isdigit() and int(text) in label_set.id2label:
            idx = int(text)
        elif text.lower() in by_name:
            idx = by_name[text.lower()]
        else:
            raise SelectionError(
                f"unknown rare class {text!r} for label set {label_set.name}; use a class name or id: "
                + ", ".join(f"{i} {n}" for i, n in sorted(label_set.id2label.items()))
            )
        if idx not in chosen:
            chosen.append(idx)
    absent = [label_set.id2label[i] for i in chosen if frequency[i] == 0]
    if absent:
        logger.warning(f"rare classes absent from every pool image: {', '.join(absent)}")
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------------
# Strategies


def weighted_order(scores: np.ndarray, paths: Sequence[str]) -> np.ndarray:
    """Image indices by score descending, ties broken by path ascending."""
    return np.lexsort((np.asarray(paths, dtype=str), -np.asarray(scores, dtype=np.float64)))


def random_order(count: int, seed: int) -> np.ndarray:
    """A seeded uniform permutation of ``count`` images."""
    return np.random.default_rng((seed, RANDOM_SALT)).permutation(count)


def rare_class_sampling_order(
    presence: np.ndarray, frequency: np.ndarray, temperature: float = 0.01, seed: int = 0, count: int | None = None
) -> np.ndarray:
    """DAFormer-style picks: class c with probability ∝ exp((1 - f_c) / T), then a uniform unpicked image with c.

    Returns the first ``count`` picks (default all images). Once every image holding a present class is picked, the
    rest (images without any present class) follow in index order. The first k picks for any k equal a run with
    budget k and the same seed.
    """
    num_images, num_classes = presence.shape
    count = num_images if count is None else count
    rng = np.random.default_rng((seed, RARE_CLASS_SALT))
    # A shuffled member list per class: its first unpicked entry is a uniform draw from the class's unpicked images.
    members = [rng.permutation(np.flatnonzero(presence[:, c])) for c in range(num_classes)]
    cursor = np.zeros(num_classes, dtype=np.int64)
    remaining = presence.sum(axis=0).astype(np.int64)
    logits = (1.0 - frequency) / temperature
    picked = np.zeros(num_images, dtype=bool)
    order: list[int] = []
    while len(order) < count:
        active = np.flatnonzero(remaining > 0)
        if not active.size:
            break
        weights = np.exp(logits[active] - logits[active].max())
        # Fixed-size batches consume the generator the same way for any count, so shorter runs are prefixes.
        draws = rng.choice(active, size=CLASS_DRAW_BATCH, p=weights / weights.sum())
        for c in draws:
            if len(order) == count or remaining[c] == 0:
                break  # the class ran out during this batch: draw again from the classes left
            while picked[members[c][cursor[c]]]:
                cursor[c] += 1
            image = int(members[c][cursor[c]])
            picked[image] = True
            remaining -= presence[image]
            order.append(image)
    if len(order) < count:
        order.extend(np.flatnonzero(~picked)[: count - len(order)].tolist())
    return np.asarray(order, dtype=np.int64)


def strategy_order(
    strategy: str, scores: np.ndarray, paths: Sequence[str], presence: np.ndarray, frequency: np.ndarray,
    temperature: float, seed: int, count: int | None = None,
) -> np.ndarray:
    """The first ``count`` images (default all) in the order ``strategy`` picks them."""
    if strategy == "weighted":
        order = weighted_order(scores, paths)
    elif strategy == "random":
        order = random_order(len(paths), seed)
    elif strategy == "rare_class_sampling":
        return rare_class_sampling_order(presence, frequency, temperature, seed, count)
    else:
        raise SelectionError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return order if count is None else order[:count]


@dataclass(frozen=True, eq=False)
class Selection:
    """Scores, ranks and the chosen subset of a pool, plus each strategy's subset at the same K for comparison."""

    paths: list[str]
    sequences: list[str]
    cds: np.ndarray
    rcs: np.ndarray
    ics: np.ndarray
    score: np.ndarray
    rank: np.ndarray  # 1-based position in the strategy's picking order
    selected: np.ndarray
    presence: np.ndarray
    frequency: np.ndarray
    rare_ids: list[int]
    subsets: dict[str, np.ndarray]  # strategy -> indices of its K picks
    header: dict[str, Any]


def select_images(
    stats: ClassStats, args: SelectionArguments, label_set: LabelSet, source: str | None = None
) -> Selection:
    """Score every pool image, rank it by ``args.strategy``, and keep the first K."""
    pool, histograms = stats.pool, stats.histograms
    source = source or pool.source
    budget = resolve_budget(len(pool), args.num_images, args.fraction, source)
    presence = class_presence(histograms, label_set.num_labels, args.min_pixels)
    frequency = image_frequency(presence)
    rare_ids = resolve_rare_classes(frequency, label_set, args.rare_classes, args.rare_threshold)
    cds = class_diversity(histograms, label_set.num_labels, args.min_pixels, args.cds_mode)
    if args.rcs_mode == "count" and not rare_ids and args.beta > 0:
        logger.warning("the rare set is empty, so RCS is 0 for every image; raise --rare_threshold or name "
                       "--rare_classes")
    rcs = rare_class_score(presence, frequency, args.rcs_mode, rare_ids)
    ics = sequence_score(pool.sequences, args.ics_mode)
    score = weighted_score(cds, rcs, ics, args.alpha, args.beta, args.gamma)
    order = strategy_order(args.strategy, score, pool.paths, presence, frequency, args.temperature, args.seed)
    rank = np.empty(len(pool), dtype=np.int64)
    rank[order] = np.arange(1, len(pool) + 1)
    subsets = {
        name: order[:budget] if name == args.strategy else strategy_order(
            name, score, pool.paths, presence, frequency, args.temperature, args.seed, budget)
        for name in STRATEGIES
    }
    rare = [{"id": c, "name": label_set.id2label[c], "image_frequency": float(frequency[c])} for c in rare_ids]
    header = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "formula": FORMULA,
        "alpha": args.alpha,
        "beta": args.beta,
        "gamma": args.gamma,
        "num_images": budget,
        "num_candidates": len(pool),
        "strategy": args.strategy,
        "seed": args.seed,
        "temperature": args.temperature,
        "cds_mode": args.cds_mode,
        "rcs_mode": args.rcs_mode,
        "ics_mode": args.ics_mode,
        "min_pixels": args.min_pixels,
        "max_cds": float(cds.max()),
        "max_rcs": float(rcs.max()),
        "max_ics": float(ics.max()),
        "label_set": {"name": label_set.name, "num_labels": label_set.num_labels,
                      "id2label": {str(i): n for i, n in sorted(label_set.id2label.items())}},
        "rare_classes": rare,
        "rare_set": "named" if args.rare_classes else f"image frequency < {args.rare_threshold}",
        "dataset": {"source": source, "pool": "train", "fingerprint": paths_fingerprint(pool.paths)},
        "skipped": [file for file, _ in stats.skipped],
    }
    selected = rank <= budget
    return Selection(list(pool.paths), list(pool.sequences), cds, rcs, ics, score, rank, selected, presence,
                     frequency, rare_ids, subsets, header)


# ---------------------------------------------------------------------------------------------------------
# Manifest


def manifest_rows(selection: Selection) -> list[dict[str, Any]]:
    """The manifest rows (DESIGN.md columns) in rank order."""
    order = np.argsort(selection.rank, kind="stable")
    return [
        {"path": selection.paths[i], "sequence": selection.sequences[i], "cds": float(selection.cds[i]),
         "rcs": float(selection.rcs[i]), "ics": float(selection.ics[i]), "score": float(selection.score[i]),
         "rank": int(selection.rank[i]), "selected": bool(selection.selected[i])}
        for i in order
    ]


def write_manifest(selection: Selection, output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write manifest.json and manifest.csv (header as ``# key: value`` lines) atomically; no timestamps."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    header, rows = selection.header, manifest_rows(selection)
    body = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    json_text = '{"header": ' + json.dumps(header, indent=2, ensure_ascii=False) + ',\n"rows": [\n' + body + "\n]}\n"
    buffer = io.StringIO()
    for key, value in header.items():
        buffer.write(f"# {key}: {json.dumps(value, ensure_ascii=False)}\n")
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "cds": repr(row["cds"]), "rcs": repr(row["rcs"]), "ics": repr(row["ics"]),
                         "score": repr(row["score"]), "selected": "true" if row["selected"] else "false"})
    json_path, csv_path = output_dir / MANIFEST_JSON, output_dir / MANIFEST_CSV
    write_text_atomically(json_path, json_text)
    write_text_atomically(csv_path, buffer.getvalue())
    return json_path, csv_path


def _typed_row(row: dict[str, Any], source: str, line: int) -> dict[str, Any]:
    try:
        selected = row["selected"]
        if isinstance(selected, str):
            if selected.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"selected must be true or false, got {selected!r}")
            selected = selected.strip().lower() in ("true", "1")
        return {"path": str(row["path"]), "sequence": str(row["sequence"]), "cds": float(row["cds"]),
                "rcs": float(row["rcs"]), "ics": float(row["ics"]), "score": float(row["score"]),
                "rank": int(row["rank"]), "selected": bool(selected)}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{source}: manifest row {line} is malformed ({err!r})") from err


def load_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read manifest.json or manifest.csv: (header, rows) with typed columns (floats, int rank, bool selected)."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{source}: selection manifest does not exist") from err
    except OSError as err:
        raise DataError(f"{source}: cannot read the selection manifest ({err})") from err
    if source.endswith(".csv"):
        lines = text.splitlines()
        header_lines = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
        header: dict[str, Any] = {}
        for number, line in enumerate(header_lines, start=1):
            key, _, value = line[1:].strip().partition(": ")
            try:
                header[key] = json.loads(value)
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: header line {number} is not 'key: JSON value'") from err
        reader = csv.DictReader(lines[len(header_lines):])
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{source}: manifest lacks columns {sorted(missing)}")
        raw_rows: list[dict[str, Any]] = list(reader)
    else:
        try:
            payload = json.loads(text)
            header, raw_rows = payload["header"], payload["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{source}: not a selection manifest (expected JSON with 'header' and 'rows')") from err
        if not isinstance(header, dict) or not isinstance(raw_rows, list):
            raise DataError(f"{source}: not a selection manifest (expected JSON with 'header' and 'rows')")
    if header.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{source}: not a selection manifest (format {header.get('format')!r})")
    rows = [_typed_row(row, source, i + 1) for i, row in enumerate(raw_rows)]
    paths = [row["path"] for row in rows]
    if len(set(paths)) != len(paths):
        raise DataError(f"{source}: the manifest lists some paths twice")
    return header, rows


def selected_paths(manifest_path: str | os.PathLike[str]) -> set[str]:
    """The ``path`` ids of the selected rows, to match against a dataset's ``path`` column (train split)."""
    _, rows = load_manifest(manifest_path)
    return {row["path"] for row in rows if row["selected"]}


# ---------------------------------------------------------------------------------------------------------
# Report and plots


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value ("2" before "10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _share(part: int | float, whole: int | float) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def strategy_comparison(selection: Selection) -> dict[str, dict[str, np.ndarray | float]]:
    """Per strategy: the share of its K images containing each class, mean CDS, classes and sequences covered."""
    comparison: dict[str, dict[str, Any]] = {}
    sequences = np.asarray(selection.sequences, dtype=object)
    for name, subset in selection.subsets.items():
        chosen = selection.presence[subset]
        comparison[name] = {
            "class_share": chosen.mean(axis=0) if len(subset) else np.zeros(chosen.shape[1]),
            "mean_cds": float(selection.cds[subset].mean()) if len(subset) else 0.0,
            "classes_covered": int(chosen.any(axis=0).sum()),
            "sequences_covered": len(set(sequences[subset])),
        }
    return comparison


def render_report(selection: Selection, label_set: LabelSet, plots: Sequence[str] = ()) -> str:
    """report.md: counts, class image frequency before and after, the strategy comparison, images per sequence."""
    header = selection.header
    budget, total = header["num_images"], header["num_candidates"]
    chosen = np.flatnonzero(selection.selected)
    pool_counts = selection.presence.sum(axis=0)
    subset_counts = selection.presence[chosen].sum(axis=0)
    rare = set(selection.rare_ids)
    names = label_set.id2label
    lines = [
        "# Image selection report",
        "",
        f"Ranked the {total} images of the training pool of `{header['dataset']['source']}` "
        f"(fingerprint `{header['dataset']['fingerprint']}`) and selected {budget} with strategy "
        f"**{header['strategy']}** (seed {header['seed']}). Validation and test images are not ranked.",
        "",
        f"`{FORMULA}` with alpha = {header['alpha']}, beta = {header['beta']}, gamma = {header['gamma']}:",
        "",
        f"- CDS ({header['cds_mode']}): " + (
            f"classes with at least {header['min_pixels']} pixel(s) in the image" if header["cds_mode"] == "count"
            else "Shannon entropy (nats) of the image's class pixel shares"),
        f"- RCS ({header['rcs_mode']}): " + (
            "sum over present classes of -ln(share of pool images containing the class)"
            if header["rcs_mode"] == "neglog" else "number of present classes from the rare set"),
        f"- ICS ({header['ics_mode']}): " + (
            "images in the image's sequence folder" if header["ics_mode"] == "count"
            else "1 / images in the image's sequence folder"),
        f"- Rare set ({header['rare_set']}): " + (
            ", ".join(f"{names[c]} ({selection.frequency[c]:.1%})" for c in selection.rare_ids) or "none"),
        "",
        "## Counts",
        "",
        "| | training pool | selected |",
        "| --- | ---: | ---: |",
        f"| images | {total} | {budget} |",
        f"| sequences | {len(set(selection.sequences))} | {len({selection.sequences[i] for i in chosen})} |",
        f"| classes in at least one image | {int((pool_counts > 0).sum())} | {int((subset_counts > 0).sum())} |",
        f"| mean CDS | {selection.cds.mean():.3f} | {selection.cds[chosen].mean():.3f} |",
        f"| mean RCS | {selection.rcs.mean():.3f} | {selection.rcs[chosen].mean():.3f} |",
        f"| score range | {selection.score.min():.4f} - {selection.score.max():.4f} | "
        f"{selection.score[chosen].min():.4f} - {selection.score[chosen].max():.4f} |",
        f"| images skipped as bad | {len(header['skipped'])} | |",
        "",
        "## Image frequency of each class",
        "",
        "Share of images that contain the class, before (training pool) and after (selected subset) selection.",
        "",
        "| id | class | rare | pool images | pool share | selected images | selected share |",
        "| ---: | --- | :---: | ---: | ---: | ---: | ---: |",
    ]
    for c in range(label_set.num_labels):
        lines.append(
            f"| {c} | {names[c]} | {'yes' if c in rare else ''} | {int(pool_counts[c])} | "
            f"{_share(pool_counts[c], total)} | {int(subset_counts[c])} | {_share(subset_counts[c], budget)} |"
        )
    comparison = strategy_comparison(selection)
    lines += [
        "",
        f"## Strategies compared at K = {budget}",
        "",
        "Share of each strategy's images containing each rare class (random: one seeded draw; its expectation is the "
        "pool share).",
        "",
        "| class | pool | " + " | ".join(STRATEGIES) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in STRATEGIES) + " |",
    ]
    for c in selection.rare_ids:
        lines.append(f"| {names[c]} | {selection.frequency[c]:.1%} | "
                     + " | ".join(f"{comparison[s]['class_share'][c]:.1%}" for s in STRATEGIES) + " |")
    lines.append("| mean CDS | " + f"{selection.cds.mean():.2f} | "
                 + " | ".join(f"{comparison[s]['mean_cds']:.2f}" for s in STRATEGIES) + " |")
    lines.append(f"| classes covered | {int((pool_counts > 0).sum())} | "
                 + " | ".join(str(comparison[s]["classes_covered"]) for s in STRATEGIES) + " |")
    lines.append(f"| sequences covered | {len(set(selection.sequences))} | "
                 + " | ".join(str(comparison[s]["sequences_covered"]) for s in STRATEGIES) + " |")
    if selection.rare_ids:
        weighted = comparison["weighted"]["class_share"]
        random = comparison["random"]["class_share"]
        wins = [c for c in selection.rare_ids if weighted[c] > random[c]]
        lines += ["", f"weighted holds a larger share than random for {len(wins)} of {len(selection.rare_ids)} "
                      "rare classes" + ("." if len(wins) == len(selection.rare_ids) else ": not for "
                                        + ", ".join(names[c] for c in selection.rare_ids if c not in wins) + ".")]
    per_sequence: dict[str, list[int]] = {}
    for sequence, is_selected in zip(selection.sequences, selection.selected, strict=True):
        counts = per_sequence.setdefault(sequence, [0, 0])
        counts[0] += 1
        counts[1] += int(is_selected)
    lines += ["", "## Images per sequence", "", "| sequence | pool | selected | share selected |",
              "| --- | ---: | ---: | ---: |"]
    for sequence in sorted(per_sequence, key=_natural_key):
        in_pool, in_subset = per_sequence[sequence]
        lines.append(f"| {sequence} | {in_pool} | {in_subset} | {_share(in_subset, in_pool)} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(selection: Selection, label_set: LabelSet, output_dir: str | os.PathLike[str]) -> list[Path]:
    """class_frequency.png and score_distribution.png in ``output_dir`` (report.md holds the strategy table)."""
    from .visualize import plot_class_frequency, plot_score_distribution

    output_dir = Path(output_dir)
    names = [label_set.id2label[c] for c in range(label_set.num_labels)]
    subset_share = selection.presence[selection.selected].mean(axis=0)
    cutoff = float(selection.score[selection.selected].min()) if selection.header["strategy"] == "weighted" else None
    return [
        plot_class_frequency(names, selection.frequency, subset_share, selection.rare_ids,
                             output_dir / "class_frequency.png"),
        plot_score_distribution(selection.score, selection.selected, output_dir / "score_distribution.png", cutoff),
    ]


# ---------------------------------------------------------------------------------------------------------
# Materialising the subset


def _claim_target(target: Path) -> Path:
    """A fresh temporary folder beside ``target``; refuses a ``target`` that holds anything but an earlier subset."""
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / SUBSET_MARKER).exists())):
        raise SelectionError(
            f"{target}: exists and is not a subset written by run_selection.py; choose another --materialize_dir"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _swap_into_place(staging: Path, target: Path) -> None:
    (staging / SUBSET_MARKER).write_text("written by run_selection.py; replaced on every --materialize\n")
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


def _record_root(record: SampleRecord) -> Path:
    """The data root a record's ``path`` is relative to."""
    image = Path(os.path.abspath(record.image_path))
    return Path(*image.parts[: len(image.parts) - len(Path(record.path).parts)])


def _files_of_record(record: SampleRecord, root: Path, listing: dict[Path, list[str]]) -> list[Path]:
    """The image and every annotation file of a record, absolute."""
    files = [Path(os.path.abspath(record.image_path))]
    if record.label_path is None:
        return files
    label = Path(os.path.abspath(record.label_path))
    name = Path(record.image_path).name
    stem = name.rsplit(".", 1)[0]
    frame = idd_frame_name(name)
    if frame != stem and label.name.startswith(f"{frame}_gtFine_"):
        # IDD: mirror every gtFine file of the frame (polygons and the label maps of all levels).
        folder = label.parent
        if folder not in listing:
            listing[folder] = sorted(os.listdir(folder)) if folder.is_dir() else []
        siblings = [folder / f for f in listing[folder] if f.startswith(f"{frame}_gtFine_")]
        files += siblings or [label]
    else:
        files.append(label)
    return files


def materialize_files(records: Sequence[SampleRecord], target: str | os.PathLike[str], mode: str) -> Path:
    """Mirror the records' images and annotations under ``target`` by symlink or copy, in their source layout.

    An IDD tree keeps ``leftImg8bit/<split>/<seq>/`` and every ``gtFine`` file of each frame; flat folders keep
    their image and mask folders relative to the data root. ``target`` is replaced as a whole.
    """
    if mode not in ("symlink", "copy"):
        raise SelectionError(f"materialize mode must be symlink or copy here, got {mode!r}")
    target = Path(target)
    staging = _claim_target(target)
    listing: dict[Path, list[str]] = {}
    try:
        for record in records:
            root = _record_root(record)
            for source in _files_of_record(record, root, listing):
                relative = Path(os.path.relpath(source, root))
                if relative.parts[0] == os.pardir:
                    raise SelectionError(
                        f"{source}: outside the data root {root}, so it cannot be mirrored; pass --data_dir as the "
                        "folder that holds both --image_dir and --mask_dir"
                    )
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                if mode == "symlink":
                    os.symlink(source, destination)
                else:
                    shutil.copy2(source, destination)
        _swap_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _png_bytes(label_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(label_map, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _record_rows(records: Sequence[SampleRecord], level: int | None) -> Iterator[dict[str, Any]]:
    for record in records:
        image_bytes = Path(record.image_path).read_bytes()
        label_path = record.label_path
        if label_path.lower().endswith(".png"):
            label_bytes = Path(label_path).read_bytes()
        else:
            label_bytes = _png_bytes(read_label_map(label_path, level))
        yield {
            "image": {"bytes": image_bytes, "path": Path(record.image_path).name},
            "label": {"bytes": label_bytes, "path": Path(label_path).with_suffix(".png").name},
            "path": record.path,
            "sequence": record.sequence,
        }


def _dataset_rows(dataset: datasets.Dataset, indices: Sequence[int]) -> Iterator[dict[str, Any]]:
    for index in indices:
        row = dataset[int(index)]
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        yield {
            "image": {"bytes": buffer.getvalue(), "path": None},
            "label": {"bytes": _png_bytes(row["label"]), "path": None},
            "path": row["path"],
            "sequence": row["sequence"],
        }


def _subset_dataset(
    pool: CandidatePool, indices: Sequence[int], label_set: LabelSet, cache_dir: str
) -> datasets.DatasetDict:
    """The chosen images as ``DatasetDict({"train": ...})`` (image and label PNG bytes, path, sequence) in
    ``cache_dir``, which must outlive the result."""
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(),
                                  "path": datasets.Value("string"), "sequence": datasets.Value("string")})
    if pool.records is not None:
        rows = _RowGenerator(_record_rows, [pool.records[i] for i in indices], label_level(label_set))
    else:
        rows = _RowGenerator(_dataset_rows, pool.dataset, list(indices))
    fingerprint = paths_fingerprint([pool.paths[i] for i in indices])
    subset = datasets.Dataset.from_generator(rows, features=features, cache_dir=cache_dir, fingerprint=fingerprint)
    return datasets.DatasetDict({"train": subset})


class _RowGenerator:
    """A generator factory with fixed arguments (from_generator calls it without any)."""

    def __init__(self, fn: Callable[..., Iterator[dict[str, Any]]], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __call__(self) -> Iterator[dict[str, Any]]:
        return self.fn(*self.args)


def materialize_dataset(
    pool: CandidatePool, indices: Sequence[int], label_set: LabelSet, target: str | os.PathLike[str]
) -> Path:
    """``save_to_disk`` the chosen images as a self-contained ``DatasetDict({"train": ...})`` in ``target``.

    Rows hold the image and label-map PNG bytes (file layouts embed their files' own bytes; polygon annotations
    are rasterised), ``path`` and ``sequence``; the data layer loads the folder back with ``--dataset_name``.
    An earlier subset in ``target`` is replaced as a whole.
    """
    target = Path(target)
    staging = _claim_target(target)
    cache = tempfile.mkdtemp(prefix=f".{target.name}.cache.", dir=target.parent)
    try:
        _subset_dataset(pool, indices, label_set, cache).save_to_disk(str(staging))
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging)
    return target


def push_subset_to_hub(saved_at: str | os.PathLike[str], repo_id: str, private: bool = False) -> str:
    """Publish a `materialize_dataset` folder as a Hub dataset; offline or refused access is one `SelectionError`."""
    import datasets
    saved_at = os.fspath(saved_at)
    unreachable = SelectionError(
        f"cannot reach the Hugging Face Hub to push {repo_id} (offline?); the subset is saved in {saved_at}: "
        f"push it later with datasets.load_from_disk({saved_at!r}).push_to_hub({repo_id!r})"
    )
    if not hub.hub_is_reachable():
        raise unreachable
    from huggingface_hub.errors import HfHubHTTPError

    try:
        datasets.load_from_disk(saved_at).push_to_hub(repo_id, private=private)
    except (HfHubHTTPError, ConnectionError, TimeoutError) as err:
        reason = hub.one_line(err)
        raise SelectionError(
            f"pushing {repo_id} to the Hub failed ({reason}); the subset is saved in {saved_at}"
        ) from err
    return f"https://huggingface.co/datasets/{repo_id}"
