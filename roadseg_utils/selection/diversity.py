"""The diversity strategy: k-center greedy (core-set) picks over per-image embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Seed offset of the first pick when no start is given; the other strategies use 1-3.
DIVERSITY_SALT = 4


def k_center_greedy(embeddings: np.ndarray, count: int, seed: int = 0, start: Sequence[int] = ()) -> np.ndarray:
    """``count`` image indices, each the farthest (Euclidean) from those picked before it.

    The picks begin with ``start`` (e.g. the top-weighted images) or, without it, one seeded uniform draw; ties go to
    the lowest index, so the order is deterministic for a seed. Features are standardised per dimension first, so no
    single channel's scale decides the distances.
    """
    features = np.asarray(embeddings, dtype=np.float64)
    count = min(count, len(features))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    order = [int(i) for i in dict.fromkeys(start)][:count]
    if not order:
        order = [int(np.random.default_rng((seed, DIVERSITY_SALT)).integers(len(features)))]
    nearest = np.full(len(features), np.inf)
    for index in order:
        nearest = np.minimum(nearest, ((features - features[index]) ** 2).sum(axis=1))
    while len(order) < count:
        index = int(np.argmax(nearest))  # picked images are at distance 0, so never chosen again before the rest
        if nearest[index] == 0:
            unpicked = np.setdiff1d(np.arange(len(features)), order)
            order.extend(unpicked[: count - len(order)].tolist())  # duplicates of picked images: index order
            break
        order.append(index)
        nearest = np.minimum(nearest, ((features - features[index]) ** 2).sum(axis=1))
    return np.asarray(order, dtype=np.int64)
