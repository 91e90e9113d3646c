"""The per-image scores (CDS, RCS, ICS), their weighted sum, the budget K and the rare set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers.utils import logging

from ..labels import LabelSet
from .arguments import CDS_MODES, DEFAULT_NUM_IMAGES, ICS_MODES, RCS_MODES, SelectionError, check_weights

logger = logging.get_logger(__name__)

FORMULA = "score = alpha * cds / max(cds) + beta * rcs / max(rcs) + gamma * ics / max(ics)"
# The fourth term, in the formula only when its weight is positive (delta 0 keeps the three-term score exact).
UNCERTAINTY_TERM = " + delta * uncertainty / max(uncertainty)"


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
    cds: np.ndarray, rcs: np.ndarray, ics: np.ndarray, alpha: float = 0.4, beta: float = 0.4, gamma: float = 0.2,
    uncertainty: np.ndarray | None = None, delta: float = 0.0,
) -> np.ndarray:
    """``alpha * cds / max(cds) + beta * rcs / max(rcs) + gamma * ics / max(ics)`` (+ ``delta * uncertainty /
    max(uncertainty)`` when ``delta`` > 0); a zero maximum gives 0."""
    check_weights(alpha, beta, gamma, delta)
    score = alpha * _normalised(cds) + beta * _normalised(rcs) + gamma * _normalised(ics)
    if delta > 0:
        if uncertainty is None:
            raise SelectionError("delta > 0 weighs the model's uncertainty, but no uncertainty was computed")
        score = score + delta * _normalised(uncertainty)
    return score


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
