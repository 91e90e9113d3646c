"""Loading any supported layout as validated "train"/"validation"/"test" splits, as datasets or as records."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from transformers.utils import logging

from ..labels import LabelSet, get_label_set, load_id2label_file
from .arguments import SPLITS, DataSourceArguments
from .hf_source import load_hf_splits, shipped_id2label_file
from .label_cache import label_cache_path
from .layouts import find_records
from .lazy_dataset import records_to_dataset
from .legacy_pickle import load_pickle_splits
from .splits import assign_splits
from .validation import ValidationResult, check_labelled, validate_records

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)


def source_label_set(args: DataSourceArguments) -> LabelSet:
    """The label set --label_set names, else the id2label.json a Hugging Face dataset ships, else IDD level 3."""
    if args.label_set is not None:
        return get_label_set(args.label_set)
    shipped = shipped_id2label_file(args)
    if shipped is None:
        return get_label_set()
    label_set = load_id2label_file(shipped)
    logger.info(f"{label_set.num_labels} classes named by {shipped}, the dataset's own (--label_set overrides it)")
    # Named after the dataset, not after the file every such dataset calls id2label.json.
    return dataclasses.replace(label_set, name=args.dataset_name.rstrip("/").rsplit("/", 1)[-1])


def load_split_records(
    args: DataSourceArguments, label_set: LabelSet | None = None, seed: int = 0
) -> dict[str, ValidationResult]:
    """File layouts: the validated records of each split with their label histograms and sizes.

    A split whose masks hold no labelled pixel at all raises `EmptyDatasetError` naming the source and split.
    This is the record level under `load_segmentation_dataset` (same splits for the same arguments and seed),
    for callers that want the histograms, e.g. class statistics, without decoding any mask again;
    ``records_to_dataset(result.records, label_set, result.sizes)`` turns one split into its dataset.
    """
    label_set = label_set or source_label_set(args)
    splits = assign_splits(find_records(args, label_set), args, seed)
    ordered = [r for name in SPLITS for r in splits[name]]
    result = validate_records(ordered, label_set, args.on_bad_sample, args.num_workers, args.describe_source(),
                              label_cache_path(args))
    split_of_image = {r.image_path: r.split for r in ordered}
    positions: dict[str, list[int]] = {name: [] for name in SPLITS}
    for position, record in enumerate(result.records):
        positions[record.split].append(position)
    for name, chosen in positions.items():
        check_labelled(result.histograms[chosen], f"{args.describe_source()} [{name}]")
    return {
        name: ValidationResult(
            records=[result.records[i] for i in chosen],
            histograms=result.histograms[chosen],
            sizes=[result.sizes[i] for i in chosen],
            skipped=[(file, problem) for file, problem in result.skipped if split_of_image[file] == name],
        )
        for name, chosen in positions.items()
    }


def _load_file_splits(args: DataSourceArguments, label_set: LabelSet, seed: int) -> dict[str, datasets.Dataset]:
    validated = load_split_records(args, label_set, seed)
    return {name: records_to_dataset(part.records, label_set, part.sizes) for name, part in validated.items()}


def load_segmentation_dataset(
    args: DataSourceArguments, label_set: LabelSet | None = None, seed: int = 0
) -> datasets.DatasetDict:
    """Load any supported layout as "train"/"validation"/"test" with the docs/DESIGN.md row contract, validated.

    Existing val/test splits are used as they are; missing ones are carved from train (``args`` fractions,
    ``split_by``, ``seed``). Rows decode lazily; see the `roadseg_utils.data` docstring for adding transforms.
    """
    import datasets
    label_set = label_set or source_label_set(args)
    kind = args.source_kind()
    if kind == "pickle":
        splits = load_pickle_splits(args, label_set, seed)
    elif kind == "hf":
        splits = load_hf_splits(args, label_set, seed)
    else:
        splits = _load_file_splits(args, label_set, seed)
    logger.info(
        f"loaded {args.describe_source()}: " + ", ".join(f"{name} {len(splits[name])}" for name in SPLITS) + " images"
    )
    return datasets.DatasetDict({name: splits[name] for name in SPLITS})


def paths_fingerprint(paths: Iterable[str]) -> str:
    """A short hash of a set of sample ids, e.g. to tie a selection manifest or a cache to its dataset."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode("utf-8"))
    return digest.hexdigest()[:16]
