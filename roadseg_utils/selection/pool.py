"""The training pool that selection ranks (`CandidatePool`) and how it is found for every data layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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
