"""The picking orders (weighted, random, rare-class sampling) and `select_images`, which scores and ranks a pool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.utils import logging

from ..data import paths_fingerprint
from ..labels import LabelSet
from .arguments import STRATEGIES, SelectionArguments, SelectionError
from .class_stats import ClassStats
from .diversity import k_center_greedy
from .manifest import MANIFEST_FORMAT, MANIFEST_VERSION
from .scoring import (
    FORMULA,
    UNCERTAINTY_TERM,
    class_diversity,
    class_presence,
    image_frequency,
    rare_class_score,
    resolve_budget,
    resolve_rare_classes,
    sequence_score,
    weighted_score,
)

logger = logging.get_logger(__name__)

# Seed offsets, so each strategy draws from its own stream of the same seed.
RANDOM_SALT = 1
RARE_CLASS_SALT = 2
# Classes drawn per batch by rare-class sampling; the draw is redone when a class runs out of images.
CLASS_DRAW_BATCH = 256


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


def diversity_order(
    embeddings: np.ndarray, scores: np.ndarray, paths: Sequence[str], seed: int, start: int = 0,
    count: int | None = None,
) -> np.ndarray:
    """k-center greedy picks over ``embeddings``, started from the ``start`` top-weighted images (or a seeded one)."""
    first = weighted_order(scores, paths)[:start]
    return k_center_greedy(embeddings, len(paths) if count is None else count, seed, first.tolist())


def strategy_order(
    strategy: str, scores: np.ndarray, paths: Sequence[str], presence: np.ndarray, frequency: np.ndarray,
    temperature: float, seed: int, count: int | None = None, embeddings: np.ndarray | None = None,
    diversity_start: int = 0,
) -> np.ndarray:
    """The first ``count`` images (default all) in the order ``strategy`` picks them."""
    if strategy == "weighted":
        order = weighted_order(scores, paths)
    elif strategy == "random":
        order = random_order(len(paths), seed)
    elif strategy == "rare_class_sampling":
        return rare_class_sampling_order(presence, frequency, temperature, seed, count)
    elif strategy == "diversity":
        if embeddings is None:
            raise SelectionError("--strategy diversity needs image embeddings: give --model_name_or_path")
        return diversity_order(embeddings, scores, paths, seed, diversity_start, count)
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
    uncertainty: np.ndarray | None = None  # the model's mean per-pixel entropy, when a model pass ran


def _check_labelled(presence: np.ndarray, source: str, min_pixels: int) -> None:
    """Refuse a pool without any class present (nothing to rank by); warn about images without one (they score 0)."""
    unlabelled = int((~presence.any(axis=1)).sum())
    if unlabelled == len(presence):
        raise SelectionError(
            f"{source}: no mask of the training pool holds a class with at least {min_pixels} pixel(s) (all 255 = "
            "ignore?), so there is nothing to rank images by"
        )
    if unlabelled:
        logger.warning(f"{unlabelled} of {len(presence)} pool images hold no class with at least {min_pixels} "
                       "pixel(s) (only 255 = ignore?); their CDS and RCS are 0")


def select_images(
    stats: ClassStats, args: SelectionArguments, label_set: LabelSet, source: str | None = None,
    uncertainty: np.ndarray | None = None, embeddings: np.ndarray | None = None, model: dict[str, str] | None = None,
) -> Selection:
    """Score every pool image, rank it by ``args.strategy``, and keep the first K.

    ``uncertainty`` and ``embeddings`` come from a model pass (`compute_model_scores`), described by ``model``
    (name and fingerprint) in the manifest; without embeddings the diversity strategy is left out of the comparison.
    """
    pool, histograms = stats.pool, stats.histograms
    source = source or pool.source
    budget = resolve_budget(len(pool), args.num_images, args.fraction, source)
    presence = class_presence(histograms, label_set.num_labels, args.min_pixels)
    _check_labelled(presence, source, args.min_pixels)
    frequency = image_frequency(presence)
    rare_ids = resolve_rare_classes(frequency, label_set, args.rare_classes, args.rare_threshold)
    cds = class_diversity(histograms, label_set.num_labels, args.min_pixels, args.cds_mode)
    if args.rcs_mode == "count" and not rare_ids and args.beta > 0:
        logger.warning("the rare set is empty, so RCS is 0 for every image; raise --rare_threshold or name "
                       "--rare_classes")
    rcs = rare_class_score(presence, frequency, args.rcs_mode, rare_ids)
    ics = sequence_score(pool.sequences, args.ics_mode)
    score = weighted_score(cds, rcs, ics, args.alpha, args.beta, args.gamma, uncertainty, args.delta)
    order = strategy_order(args.strategy, score, pool.paths, presence, frequency, args.temperature, args.seed,
                           embeddings=embeddings, diversity_start=args.diversity_start)
    rank = np.empty(len(pool), dtype=np.int64)
    rank[order] = np.arange(1, len(pool) + 1)
    subsets = {
        name: order[:budget] if name == args.strategy else strategy_order(
            name, score, pool.paths, presence, frequency, args.temperature, args.seed, budget, embeddings,
            args.diversity_start)
        for name in STRATEGIES if name != "diversity" or embeddings is not None
    }
    rare = [{"id": c, "name": label_set.id2label[c], "image_frequency": float(frequency[c])} for c in rare_ids]
    header = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "formula": FORMULA + (UNCERTAINTY_TERM if args.delta > 0 else ""),
        "alpha": args.alpha,
        "beta": args.beta,
        "gamma": args.gamma,
        "delta": args.delta,
        "label_source": args.label_source,
        "model": model,
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
    if args.strategy == "diversity":
        header["diversity_start"] = args.diversity_start
    return Selection(list(pool.paths), list(pool.sequences), cds, rcs, ics, score, rank, selected, presence,
                     frequency, rare_ids, subsets, header, uncertainty)
