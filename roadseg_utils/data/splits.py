"""Seeded train/validation/test splits of records or datasets, by image or by whole sequence, and subsampling."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from transformers.utils import logging

from .arguments import SPLITS, DataSourceArguments
from .layouts import SampleRecord
from .lazy_dataset import dataset_column

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)


def _normalised_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(fractions)}")
    total = sum(fractions.values())
    return {name: value / total for name, value in fractions.items()}


def _allocate_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder counts; every split with a positive fraction gets at least one item if there are enough."""
    exact = {name: share * total for name, share in fractions.items()}
    counts = {name: int(np.floor(value)) for name, value in exact.items()}
    by_remainder = sorted(fractions, key=lambda n: (-(exact[n] - counts[n]), list(fractions).index(n)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    positive = [n for n, share in fractions.items() if share > 0]
    if total >= len(positive):
        for name in positive:
            if counts[name] == 0:
                donor = max(positive, key=lambda n: counts[n])
                counts[donor] -= 1
                counts[name] = 1
    return counts


def split_indices(
    keys: Sequence[str], groups: Sequence[str], fractions: Mapping[str, float], seed: int, split_by: str
) -> dict[str, list[int]]:
    """Seeded split of items into named parts; items are identified by ``keys`` so input order does not matter."""
    if split_by not in ("image", "sequence"):
        raise ValueError(f"split_by must be 'image' or 'sequence', got {split_by!r}")
    shares = _normalised_fractions(fractions)
    rng = np.random.default_rng(seed)
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    assigned: dict[str, list[int]] = {name: [] for name in shares}
    if split_by == "image":
        counts = _allocate_counts(len(order), shares)
        shuffled = [order[i] for i in rng.permutation(len(order))]
        start = 0
        for name in shares:
            assigned[name] = shuffled[start: start + counts[name]]
            start += counts[name]
    else:
        members: dict[str, list[int]] = defaultdict(list)
        for index in order:
            members[groups[index]].append(index)
        names = sorted(members)
        shuffled_groups = [names[i] for i in rng.permutation(len(names))]
        targets = {name: share * len(order) for name, share in shares.items()}
        positive = [n for n, share in shares.items() if share > 0]
        if len(names) < len(positive):
            logger.warning(f"only {len(names)} sequences for {len(positive)} splits: some splits stay empty")
        filled = dict.fromkeys(shares, 0)
        for position, group in enumerate(shuffled_groups):
            empty = [n for n in positive if filled[n] == 0]
            # Once only as many groups remain as splits still empty, each of those gets one.
            candidates = empty if len(shuffled_groups) - position <= len(empty) else positive
            name = max(candidates, key=lambda n: (targets[n] - filled[n], -positive.index(n)))
            assigned[name].extend(members[group])
            filled[name] += len(members[group])
    return {name: sorted(indices, key=lambda i: keys[i]) for name, indices in assigned.items()}


def split_records(
    records: Sequence[SampleRecord], fractions: Mapping[str, float], seed: int, split_by: str = "image"
) -> dict[str, list[SampleRecord]]:
    """Seeded split of records into ``fractions``' parts (renormalised), each sorted by ``path``.

    ``split_by="sequence"`` keeps every sequence whole, matching the fractions by image count as closely as
    whole sequences allow. The result depends only on the records, the fractions and the seed.
    """
    keys = [r.path for r in records]
    indices = split_indices(keys, [r.sequence for r in records], fractions, seed, split_by)
    return {name: [records[i] for i in chosen] for name, chosen in indices.items()}


def split_dataset(
    dataset: datasets.Dataset, fractions: Mapping[str, float], seed: int, split_by: str = "image"
) -> datasets.DatasetDict:
    """`split_records` for a dataset with ``path`` and ``sequence`` columns; formats carry over."""
    import datasets
    keys = dataset_column(dataset, "path")
    groups = dataset_column(dataset, "sequence") if split_by == "sequence" else keys
    indices = split_indices(keys, groups, fractions, seed, split_by)
    return datasets.DatasetDict({name: dataset.select(chosen) for name, chosen in indices.items()})


def carving_fractions(present: Iterable[str], args: DataSourceArguments) -> dict[str, float]:
    """Train plus every split that is missing, with their fractions (renormalised by the splitter)."""
    present = set(present)
    return {name: args.fractions[name] for name in SPLITS if name == "train" or name not in present}


def subsample(count: int, max_samples: int | None, seed: int, salt: int) -> list[int] | None:
    """Sorted seeded indices of ``max_samples`` of ``count`` items (``salt`` varies them per split); None keeps all."""
    if max_samples is None or count <= max_samples:
        return None
    return sorted(np.random.default_rng((seed, salt)).choice(count, max_samples, replace=False).tolist())


def assign_splits(
    records: Sequence[SampleRecord], args: DataSourceArguments, seed: int
) -> dict[str, list[SampleRecord]]:
    """Records per split: existing val/test folders as they are, missing splits carved from train.

    Each returned record's ``split`` is its final split; ``max_samples`` caps each split (seeded); every
    list is sorted by ``path``, so the order is stable for caching.
    """
    found: dict[str, list[SampleRecord]] = {name: [] for name in SPLITS}
    for record in records:
        found[record.split or "train"].append(record)
    present = [name for name in ("validation", "test") if found[name]]
    carving = carving_fractions(present, args)
    if len(carving) > 1 and sum(carving.values()) > 0 and found["train"]:
        logger.info(f"carving {', '.join(n for n in carving if n != 'train')} from train ({args.split_by} split)")
        found.update(split_records(found["train"], carving, seed, args.split_by))
    result = {}
    for salt, name in enumerate(SPLITS):
        chosen = found[name]
        keep = subsample(len(chosen), args.max_samples, seed, salt)
        if keep is not None:
            chosen = [chosen[i] for i in keep]
        result[name] = sorted((replace(r, split=name) for r in chosen), key=lambda r: r.path)
    return result
