"""`LabelCache`: one per-tree file of label-map facts (size, histogram, verdict) shared by every script.

Selection, fine-tuning and evaluation check a file sample the same way (`check_sample_files`: the image's header,
the mask decoded, their sizes) and keep what they found in ``<tree>/.roadseg_cache/label_cache.npz``, keyed by both
files' paths and `file_stamp` (size, mtime, ctime, inode), so a changed file is checked again and an unchanged one
never is: a second start on an unchanged tree decodes nothing. Label values are checked against each run's label
set from the cached histogram, never cached as a verdict. ``--label_cache_dir`` moves the cache; a tree that cannot
be written falls back to a folder under the Hugging Face datasets cache. Hugging Face datasets and pickles are not
cached by fine-tuning and evaluation (their rows are validated as they load); selection keys their histograms by
the dataset fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from transformers.utils import logging

from ..atomic import write_atomically
from ..labels import LabelSet, pixel_counts
from ..parallel import map_in_order, resolve_workers
from ..progress import progress_bar
from .arguments import DataSourceArguments
from .decoding import image_size, label_level, read_label_map, to_label_map
from .errors import (
    BadSampleError,
    MissingMaskError,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    reason,
)
from .image_files import STAMP_FIELDS, check_regular_file, file_stamp
from .layouts import SampleRecord
from .validation import SampleVerdict, check_on_bad_sample

logger = logging.get_logger(__name__)

CACHE_FOLDER = ".roadseg_cache"
CACHE_FILE = "label_cache.npz"
# 3: one cache per tree (was class_stats.npz per selection output), image sizes kept.
CACHE_VERSION = 3
# An entry holds the image's and the label's `file_stamp`.
STAMP_WIDTH = 2 * STAMP_FIELDS
# A sample's stamp where there is no file to stamp: dataset rows, keyed by fingerprint.
NO_STAMP = (0,) * STAMP_WIDTH
# The verdicts a cached entry may hold; label values are checked against the run's label set, never cached.
CACHED_ERRORS = {cls.__name__: cls for cls in (MissingMaskError, UnreadableImageError, UnreadableMaskError,
                                               SizeMismatchError)}
# Samples per worker task: large enough to amortise inter-process traffic, small enough for a smooth progress bar.
CHECK_CHUNK = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A temporary cache file (`atomic.write_atomically`) older than this was left by a killed run, not being written.
STALE_TEMPORARY_S = 3600.0
_ARRAYS = ("version", "keys", "stamps", "histograms", "sizes", "failed", "errors", "problems")

# (pool index, verdict, stamp to cache it under or None) for each index to check.
Decoder = Callable[[np.ndarray], Iterator[tuple[int, SampleVerdict, "tuple[int, ...] | None"]]]


def _fallback_dir(tree: Path) -> Path:
    """A folder of the Hugging Face datasets cache for a tree that cannot be written, named by its path."""
    import datasets
    digest = hashlib.sha256(str(tree).encode("utf-8")).hexdigest()[:16]
    return Path(datasets.config.HF_DATASETS_CACHE) / "roadseg_label_cache" / digest


def _writable(folder: Path) -> bool:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing is not None and existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def label_cache_path(args: DataSourceArguments) -> Path:
    """The label cache of ``args``' source: in --label_cache_dir, else in the tree (or, read-only, the HF cache).

    The tree is --data_dir, or --mask_dir for image/mask folders without one (--image_dir for images alone, whose
    model predictions selection keeps there); a Hugging Face dataset or pickle
    has its cache under the Hugging Face datasets cache, named by the source.
    """
    if args.label_cache_dir is not None:
        return Path(args.label_cache_dir).expanduser() / CACHE_FILE
    if args.image_dir is not None and args.mask_dir is None and args.data_dir is None:
        tree = Path(args.image_dir)  # images alone, which selection ranks from a model's predictions
    elif args.source_kind() in ("hf", "pickle"):
        return _fallback_dir(Path(args.describe_source())) / CACHE_FILE
    else:
        tree = Path(args.data_dir if args.data_dir is not None else args.mask_dir)
    tree = tree.expanduser().resolve()
    folder = tree / CACHE_FOLDER
    return (folder if _writable(folder) else _fallback_dir(tree)) / CACHE_FILE


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


class LabelCache:
    """Sample verdicts keyed by (image, label) path and both files' stamps, stored as one ``.npz`` file.

    A good sample's entry is its label histogram and size, a bad one's the error and problem (a corrupt image, a
    size mismatch), so a rerun reads no image and decodes no label map. Entries of samples not seen in a run are
    kept, so switching between splits, levels or ``--max_samples`` reuses them. A cache that cannot be read
    (truncated, foreign, another version) is rebuilt after one warning.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._index: dict[str, int] = {}
        self._stamps = np.zeros((0, STAMP_WIDTH), dtype=np.int64)
        self.histograms = np.zeros((0, 256), dtype=np.int64)
        self.sizes = np.zeros((0, 2), dtype=np.int64)
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
                    raise ValueError(f"holds {sorted(stored.files)}, not a label cache")
                arrays = {name: stored[name] for name in _ARRAYS}
            if int(arrays["version"]) != CACHE_VERSION:
                raise ValueError(f"cache format {int(arrays['version'])}, not {CACHE_VERSION}")
            keys, stamps, histograms, sizes = arrays["keys"], arrays["stamps"], arrays["histograms"], arrays["sizes"]
            failed, errors, problems = arrays["failed"], arrays["errors"], arrays["problems"]
            count = len(keys)
            if not (keys.ndim == 1 and (count == 0 or keys.dtype.kind == "U")
                    and stamps.shape == (count, STAMP_WIDTH) and stamps.dtype == np.int64
                    and histograms.shape == (count, 256) and histograms.dtype == np.int64
                    and sizes.shape == (count, 2) and sizes.dtype == np.int64
                    and failed.ndim == 1 and failed.dtype == np.int64 and errors.shape == problems.shape == failed.shape
                    and (failed.size == 0 or (errors.dtype.kind == problems.dtype.kind == "U"
                                              and failed.min() >= 0 and failed.max() < count))
                    and (count == 0 or (histograms.min() >= 0 and sizes.min() >= 0))):
                raise ValueError("arrays of the wrong shape or type")
            failures = {}
            for position, error, problem in zip(failed.tolist(), errors.tolist(), problems.tolist(), strict=True):
                if error not in CACHED_ERRORS:
                    raise ValueError(f"unknown verdict {error!r}")
                failures[position] = (CACHED_ERRORS[error], problem)
        except Exception as err:  # a zip, format or content error all mean the same: decode again
            logger.warning(f"{self.path}: unreadable label cache ({type(err).__name__}: {err}); rebuilding it")
            return
        self._index = {key: i for i, key in enumerate(keys.tolist())}
        self._stamps, self.histograms, self.sizes, self._failures = stamps, histograms, sizes, failures

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
        height, width = self.sizes[position].tolist()
        return SampleVerdict(name, histogram=self.histograms[position], height=height, width=width)

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
        sizes = np.concatenate([self.sizes[kept], np.array([(v.height, v.width) for _, v in new], np.int64)])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        write_atomically(self.path, lambda stream: np.savez(
            stream, version=np.int64(CACHE_VERSION), keys=np.array(keys, dtype=str), stamps=stamps,
            histograms=histograms, sizes=sizes, failed=np.array([f[0] for f in failures], dtype=np.int64),
            errors=np.array([f[1].__name__ for f in failures], dtype=str),
            problems=np.array([f[2] for f in failures], dtype=str),
        ))


    def _remove_stale_temporaries(self) -> None:
        """Temporary cache files of killed runs; no run holds the folder, so only ones too old to be in use go."""
        temporary = re.compile(rf"\.{re.escape(self.path.name)}\.[0-9a-f]{{32}}\.tmp")
        cutoff = time.time() - STALE_TEMPORARY_S
        for entry in self.path.parent.iterdir():
            try:
                if temporary.fullmatch(entry.name) and entry.lstat().st_mtime < cutoff:
                    entry.unlink()
            except FileNotFoundError:  # removed by another run meanwhile
                continue


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
    anything else goes through `to_label_map` and its checks (palette indices kept, lossy formats refused). A
    polygon JSON is rasterised at IDD ``level`` first.
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


def check_sample_files(image_path: str, label_path: str, level: int | None) -> tuple[SampleVerdict, bool]:
    """One sample's verdict (image header and integrity, mask decoded, sizes equal) and whether it may be cached."""
    try:
        height, width = image_size(image_path, image_path)
    except Exception as err:  # any failure to read the image's header makes the sample unusable
        problem = err.problem if isinstance(err, BadSampleError) else f"cannot read image ({reason(err)})"
        return SampleVerdict(image_path, UnreadableImageError, problem), not _is_transient(err)
    if not os.path.lexists(label_path):
        return SampleVerdict(image_path, MissingMaskError, f"mask {label_path} does not exist"), False
    try:
        check_regular_file(label_path, lambda detail: UnreadableMaskError(label_path, detail))
        histogram, shape = label_map_counts(label_path, level)
    except Exception as err:  # any failure to decode the mask makes the sample unusable
        detail = str(err) if isinstance(err, BadSampleError) else f"{label_path}: {reason(err)}"
        verdict = SampleVerdict(image_path, UnreadableMaskError, f"cannot read mask ({detail})")
        return verdict, not _is_transient(err)
    if shape != (height, width):
        problem = f"mask is {shape[0]}x{shape[1]} but image is {height}x{width}"
        return SampleVerdict(image_path, SizeMismatchError, problem), True
    return SampleVerdict(image_path, histogram=histogram, height=height, width=width), True


def file_verdicts(
    tasks: list[tuple[str, str | None]], level: int | None
) -> list[tuple[SampleVerdict, tuple[int, ...] | None]]:
    """Each (image, label) sample's verdict, with the stamp to cache it under (None: not cacheable)."""
    outcomes: list[tuple[SampleVerdict, tuple[int, ...] | None]] = []
    for image_path, label_path in tasks:
        if label_path is None:
            outcomes.append((SampleVerdict(image_path, MissingMaskError, "has no mask"), None))
            continue
        try:
            before = file_stamp(image_path) + file_stamp(label_path)
        except OSError:
            before = None
        verdict, cacheable = check_sample_files(image_path, label_path, level)
        try:
            after = file_stamp(image_path) + file_stamp(label_path)
        except OSError:
            after = None
        # Stamped before and after reading: a file replaced meanwhile is not cached under either stamp.
        outcomes.append((verdict, before if cacheable and before == after else None))
    return outcomes


class _FileVerdictTask:
    """Picklable per-chunk task for worker processes."""

    def __init__(self, level: int | None) -> None:
        self.level = level

    def __call__(self, tasks: list[tuple[str, str | None]]) -> list[tuple[SampleVerdict, tuple[int, ...] | None]]:
        return file_verdicts(tasks, self.level)


def decode_in_chunks(
    fn: Callable[[Any], list[tuple[SampleVerdict, tuple[int, ...] | None]]],
    chunks: list[np.ndarray],
    tasks: list[Any],
    workers: int,
    progress: bool,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[tuple[int, SampleVerdict, tuple[int, ...] | None]]:
    """(index, verdict, stamp) of each index of ``chunks``, ``fn`` of each task in ``workers`` processes, with a bar."""
    total = sum(len(chunk) for chunk in chunks)
    with progress_bar(total=total, desc="checking label maps", unit="map", enabled=progress) as bar, \
            closing(map_in_order(fn, tasks, workers, initializer, initargs)) as results:
        for chunk, outcomes in zip(chunks, results, strict=True):
            for index, (verdict, stamp) in zip(chunk.tolist(), outcomes, strict=True):
                yield index, verdict, stamp
            bar.update(len(chunk))


def record_decoder(records: Sequence[SampleRecord], level: int | None, workers: int, progress: bool) -> Decoder:
    """The `Decoder` of file records: `file_verdicts` of chunks of them, in ``workers`` processes."""
    def decode(todo: np.ndarray) -> Iterator[tuple[int, SampleVerdict, tuple[int, ...] | None]]:
        chunks = [todo[i: i + CHECK_CHUNK] for i in range(0, todo.size, CHECK_CHUNK)]
        tasks = [[(records[i].image_path, records[i].label_path) for i in chunk.tolist()] for chunk in chunks]
        return decode_in_chunks(_FileVerdictTask(level), chunks, tasks, workers, progress)
    return decode


@dataclass(frozen=True, eq=False)
class CheckedSamples:
    """What checking samples found: per sample its histogram and size (zeros when bad), the bad ones' verdicts."""

    histograms: np.ndarray  # (N, 256) int64
    sizes: np.ndarray  # (N, 2) int64 height, width
    failures: dict[int, SampleVerdict]
    decoded: int  # samples checked (label map decoded) by this call; the others came from the cache


def check_with_cache(
    keys: Sequence[str],
    stamps: np.ndarray,
    names: Sequence[str],
    decode: Decoder,
    value_failures: Callable[[np.ndarray, np.ndarray], dict[int, SampleVerdict]],
    cache_path: str | os.PathLike[str] | None,
    on_bad_sample: str,
) -> CheckedSamples:
    """Every sample's verdict: fresh cached ones reused, the others decoded (and cached), label values checked.

    ``value_failures(histograms, indices)`` gives the verdicts of samples among ``indices`` whose histogram holds
    values outside the run's label set. With ``on_bad_sample="error"`` checking stops at the first bad sample.
    """
    check_on_bad_sample(on_bad_sample)
    cache = LabelCache(cache_path) if cache_path is not None else None
    count = len(keys)
    histograms = np.zeros((count, 256), dtype=np.int64)
    sizes = np.zeros((count, 2), dtype=np.int64)
    positions = cache.lookup(keys, stamps) if cache is not None else np.full(count, -1, dtype=np.int64)
    known = np.flatnonzero(positions >= 0)
    failures: dict[int, SampleVerdict] = {}
    for index in known.tolist():
        verdict = cache.verdict(int(positions[index]), names[index])
        if verdict.error is not None:
            failures[index] = verdict
        else:
            histograms[index], sizes[index] = verdict.histogram, (verdict.height, verdict.width)
    failures.update(value_failures(histograms, known))
    todo = np.flatnonzero(positions < 0)
    if on_bad_sample == "error" and failures:
        todo = todo[todo < min(failures)]  # only a sample before the first known bad one can come first
    decoded = 0
    if todo.size:
        logger.info(f"checking {todo.size} samples ({known.size} from the label cache"
                    + (f" {cache.path}" if cache is not None else "") + ")")
        for index, verdict, stamp in decode(todo):
            decoded += 1
            if cache is not None and stamp is not None:
                cache.add(keys[index], stamp, verdict)
            if verdict.error is None:
                histograms[index], sizes[index] = verdict.histogram, (verdict.height, verdict.width)
                failures.update(value_failures(histograms, np.array([index])))
            else:
                failures[index] = verdict
            if on_bad_sample == "error" and index in failures:
                break  # every sample before this one is checked, so it is the first bad one
        if cache is not None:
            _save(cache)
    elif count:
        logger.info(f"all {count} samples checked before: read from the label cache {cache.path}")
    return CheckedSamples(histograms, sizes, failures, decoded)


def check_records(
    records: Sequence[SampleRecord],
    label_set: LabelSet,
    value_failures: Callable[[np.ndarray, np.ndarray], dict[int, SampleVerdict]],
    cache_path: str | os.PathLike[str] | None,
    num_workers: int | None,
    on_bad_sample: str,
    progress: bool = True,
) -> CheckedSamples:
    """`check_with_cache` of file records: keyed by `sample_stamps`, decoded by `file_verdicts` in parallel."""
    level = label_level(label_set)
    keys, stamps = sample_stamps(records, level)
    workers = resolve_workers(num_workers, len(records))
    decode = record_decoder(records, level, workers, progress)
    return check_with_cache(keys, stamps, [r.image_path for r in records], decode, value_failures, cache_path,
                            on_bad_sample)


def _save(cache: LabelCache) -> None:
    # The cache only saves time: a full or read-only disk here is a warning, and the run goes on.
    try:
        cache.save()
    except OSError as err:
        logger.warning(f"{cache.path}: cannot save the label cache ({err.strerror or err}); the next run checks "
                       "every sample again")
