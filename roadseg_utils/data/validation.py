"""Validating samples: the one bad-sample path (`SampleVerdict`, `sort_samples`) and `validate_records`."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from transformers.utils import logging

from ..labels import IGNORE_INDEX, LabelSet, pixel_counts
from ..parallel import map_in_order, resolve_workers
from .decoding import image_size, to_label_map
from .errors import (
    BadSampleError,
    EmptyDatasetError,
    LabelValueError,
    MissingMaskError,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    reason,
)
from .layouts import SampleRecord

logger = logging.get_logger(__name__)

VALIDATION_CHUNK = 16
ON_BAD_SAMPLE_MODES = ("error", "skip")


class SampleVerdict(NamedTuple):
    """What checking one sample found: the error type and problem of a bad one, the size and histogram of a good one."""

    name: str
    error: type[BadSampleError] | None = None
    problem: str | None = None
    histogram: np.ndarray | None = None
    height: int = 0
    width: int = 0


def check_on_bad_sample(on_bad_sample: str) -> None:
    """Refuse an ``on_bad_sample`` policy other than ``error`` or ``skip``."""
    if on_bad_sample not in ON_BAD_SAMPLE_MODES:
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")


def label_value_problem(histogram: np.ndarray, label_set: LabelSet, mask: str = "mask") -> str | None:
    """The problem of a label histogram holding values outside ``label_set`` (255 is ignore), or None."""
    num_labels = label_set.num_labels
    invalid = np.flatnonzero(histogram[num_labels:IGNORE_INDEX]) + num_labels
    if not invalid.size:
        return None
    shown = ", ".join(str(v) for v in invalid[:10]) + (", ..." if invalid.size > 10 else "")
    return (f"{mask} holds label values {shown} outside {label_set.name} "
            f"(valid: 0-{num_labels - 1}, and {IGNORE_INDEX} = ignore)")


def sort_samples(
    verdicts: Iterable[SampleVerdict], on_bad_sample: str, source: str | None = None
) -> tuple[list[int], list[SampleVerdict], list[tuple[str, str]]]:
    """Indices and verdicts of the good samples, and (name, problem) of the skipped ones: the one bad-sample policy.

    ``error`` raises the first bad sample's `BadSampleError` subclass; ``skip`` logs each one and the total. With a
    ``source``, having skipped every sample raises `EmptyDatasetError` naming it.
    """
    check_on_bad_sample(on_bad_sample)
    kept: list[int] = []
    good: list[SampleVerdict] = []
    skipped: list[tuple[str, str]] = []
    count = 0
    for count, verdict in enumerate(verdicts, start=1):
        if verdict.error is None:
            kept.append(count - 1)
            good.append(verdict)
        elif on_bad_sample == "error":
            raise verdict.error(verdict.name, verdict.problem)
        else:
            logger.warning(f"skipping {verdict.name}: {verdict.problem}")
            skipped.append((verdict.name, verdict.problem))
    if skipped:
        if source is not None and not kept:
            raise EmptyDatasetError(f"{source}: all {count} samples were skipped as bad")
        logger.warning(f"skipped {len(skipped)} of {count} samples as bad (on_bad_sample=skip)")
    return kept, good, skipped


def _inspect_sample(image: Any, label: Any, name: str, label_set: LabelSet) -> SampleVerdict:
    try:
        height, width = image_size(image, name)
    except BadSampleError as err:
        return SampleVerdict(name, type(err), err.problem)
    except (MemoryError, RecursionError):
        raise
    except Exception as err:  # any other failure to read the image makes it unusable
        return SampleVerdict(name, UnreadableImageError, f"cannot read image ({reason(err)})")
    if label is None:
        return SampleVerdict(name, MissingMaskError, "has no mask")
    if isinstance(label, (str, os.PathLike)) and not os.path.lexists(label):
        return SampleVerdict(name, MissingMaskError, f"mask {os.fspath(label)} does not exist")
    try:
        label_map = to_label_map(label, label_set.idd_level, name)
    except MissingMaskError as err:
        return SampleVerdict(name, MissingMaskError, err.problem)
    except (MemoryError, RecursionError):
        raise
    except Exception as err:  # any failure to decode the mask makes it unusable
        return SampleVerdict(name, UnreadableMaskError, f"cannot read mask ({reason(err)})")
    if label_map.shape != (height, width):
        mask_height, mask_width = label_map.shape
        return SampleVerdict(
            name, SizeMismatchError, f"mask is {mask_height}x{mask_width} but image is {height}x{width}"
        )
    histogram = pixel_counts(label_map)
    problem = label_value_problem(histogram, label_set)
    if problem is not None:
        return SampleVerdict(name, LabelValueError, problem)
    return SampleVerdict(name, histogram=histogram, height=height, width=width)


def check_labelled(histograms: Sequence[np.ndarray] | np.ndarray, source: str) -> None:
    """Refuse a non-empty split whose masks hold no labelled pixel at all (every pixel 255 = ignore).

    Training on it learns nothing and evaluating it gives a NaN mIoU, so it is an error, named by ``source``.
    """
    if len(histograms) == 0:
        return
    labelled = int(np.sum([h[:IGNORE_INDEX].sum() for h in histograms]))
    if labelled == 0:
        raise EmptyDatasetError(
            f"{source}: none of its {len(histograms)} masks holds a labelled pixel (every pixel is {IGNORE_INDEX} "
            "= ignore); check the masks and the label set"
        )


def _inspect_chunk(chunk: list[tuple[Any, Any, str]], label_set: LabelSet) -> list[SampleVerdict]:
    return [_inspect_sample(image, label, name, label_set) for image, label, name in chunk]


def check_samples(
    chunks: Iterable[list[tuple[Any, Any, str]]],
    count: int,
    label_set: LabelSet,
    on_bad_sample: str,
    num_workers: int | None,
    source: str | None = None,
) -> tuple[list[int], list[SampleVerdict], list[tuple[str, str]]]:
    """`sort_samples` over every sample's inspection, run in worker processes when there are many."""
    check_on_bad_sample(on_bad_sample)
    inspect = functools.partial(_inspect_chunk, label_set=label_set)
    with closing(map_in_order(inspect, chunks, resolve_workers(num_workers, count))) as inspected_chunks:
        return sort_samples(itertools.chain.from_iterable(inspected_chunks), on_bad_sample, source)


@dataclass(frozen=True, eq=False)
class ValidationResult:
    """The samples that passed validation, with what checking them measured."""

    records: list[SampleRecord]
    histograms: np.ndarray  # (len(records), 256) int64 pixel count of every label value
    sizes: list[tuple[int, int]]  # (height, width) per record
    skipped: list[tuple[str, str]]  # (file, problem) per skipped sample


def validate_records(
    records: Sequence[SampleRecord],
    label_set: LabelSet,
    on_bad_sample: str = "error",
    num_workers: int | None = None,
    source: str = "dataset",
    cache_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ValidationResult:
    """Check every sample (image integrity, mask present, sizes equal, values in the label set).

    With ``cache_path`` (a `label_cache.LabelCache` file) samples checked before are read from it, not decoded.
    ``error`` raises the first bad sample's `BadSampleError` subclass; ``skip`` logs each one and the total.
    No sample, or none left, raises `EmptyDatasetError` naming ``source``.
    """
    # label_cache builds on this module's verdicts, so it is imported here rather than at the top.
    from .label_cache import check_records

    if not records:
        raise EmptyDatasetError(f"{source}: no samples to load")
    checked = check_records(records, label_set, functools.partial(_value_failures, records, label_set), cache_path,
                            num_workers, on_bad_sample, progress)
    good = SampleVerdict("")
    kept, _, skipped = sort_samples(
        (checked.failures.get(index, good) for index in range(len(records))), on_bad_sample, source
    )
    return ValidationResult(
        records=[records[i] for i in kept],
        histograms=checked.histograms[kept],
        sizes=[(int(h), int(w)) for h, w in checked.sizes[kept].tolist()],
        skipped=skipped,
    )


def _value_failures(
    records: Sequence[SampleRecord], label_set: LabelSet, histograms: np.ndarray, indices: np.ndarray
) -> dict[int, SampleVerdict]:
    """Verdicts of the records among ``indices`` whose histogram holds values outside ``label_set``."""
    outside = histograms[indices, label_set.num_labels:IGNORE_INDEX].any(axis=1)
    return {index: SampleVerdict(records[index].image_path, LabelValueError,
                                 label_value_problem(histograms[index], label_set))
            for index in indices[outside].tolist()}
