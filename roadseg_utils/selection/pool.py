"""The training pool that selection ranks (`CandidatePool`) and how it is found for every data layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data import (
    DataError,
    DataSourceArguments,
    EmptyDatasetError,
    SampleRecord,
    dataset_column,
    find_records,
    load_segmentation_dataset,
)
from ..data.hf_source import load_hf_train_images
from ..data.layouts import find_image_folder
from ..labels import LabelSet

if TYPE_CHECKING:
    # Only for annotations: `datasets` is slow to import
    # (`python -X importtime -c "import datasets"`), and file layouts never need it.
    import datasets

# Seed offset of the --max_samples subset; the strategies use 1 and 2, so each draws its own stream of the seed.
SUBSAMPLE_SALT = 3


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

    def image_sources(self) -> list[str | bytes]:
        """Each image as a file path or its stored bytes (a dataset's undecoded image column), for the model pass."""
        if self.records is not None:
            return [record.image_path for record in self.records]
        return [value.get("bytes") or value.get("path") for value in dataset_column(self.dataset, "image")]

    def subset(self, indices: Sequence[int]) -> CandidatePool:
        """The pool restricted to ``indices`` (kept in the given order)."""
        return CandidatePool(
            paths=[self.paths[i] for i in indices],
            sequences=[self.sequences[i] for i in indices],
            source=self.source,
            records=[self.records[i] for i in indices] if self.records is not None else None,
            dataset=self.dataset.select(indices) if self.dataset is not None else None,
        )


def load_candidate_pool(
    data_args: DataSourceArguments, label_set: LabelSet, seed: int = 0, require_labels: bool = True
) -> CandidatePool:
    """The training pool of any supported layout, sorted by ``path``, without decoding any image or label map.

    File layouts: the train folder's records (an IDD tree's val/test folders are left out; flat folders are all
    train). Hugging Face datasets and pickles: their train split as loaded, nothing carved out. ``--max_samples``
    keeps a seeded subset. Without ``require_labels`` (scores from a model), images need no masks: an IDD tree's
    ``leftImg8bit/train`` alone, or ``--image_dir`` alone (every image under it).
    """
    source = data_args.describe_source()
    if not require_labels and data_args.image_dir is not None and data_args.mask_dir is None:
        if data_args.dataset_name is not None or data_args.pickle_path is not None:
            data_args.source_kind()  # two sources named: its one-line error
        folder = Path(data_args.data_dir or "") / data_args.image_dir
        records = _subsample(find_image_folder(folder), data_args.max_samples, seed)
        return CandidatePool([r.path for r in records], [r.sequence for r in records], source, records=records)
    kind = data_args.source_kind()
    if kind == "hf" and not require_labels:
        return _dataset_pool(load_hf_train_images(data_args), data_args.max_samples, seed, source)
    if kind in ("idd", "flat"):
        found = find_records(data_args, label_set, include_unlabeled=not require_labels)
        records = [r for r in found if (r.split or "train") == "train"]
        if not records:
            raise EmptyDatasetError(f"{source}: no annotated training images to rank")
        records = _subsample(records, data_args.max_samples, seed)
        return CandidatePool([r.path for r in records], [r.sequence for r in records], source, records=records)
    pool_args = replace(data_args, train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    return _dataset_pool(load_segmentation_dataset(pool_args, label_set, seed)["train"], None, seed, source)


def _dataset_pool(dataset: datasets.Dataset, max_samples: int | None, seed: int, source: str) -> CandidatePool:
    """A dataset's rows as a pool sorted by ``path`` (a seeded ``max_samples`` subset first, where given)."""
    if len(dataset) == 0:
        raise EmptyDatasetError(f"{source}: the train split is empty, nothing to rank")
    if max_samples is not None and len(dataset) > max_samples:
        rng = np.random.default_rng((seed, SUBSAMPLE_SALT))
        dataset = dataset.select(np.sort(rng.choice(len(dataset), max_samples, replace=False)).tolist())
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
