"""Segmentation metrics from a confusion matrix: per-class IoU and accuracy, their means, coarser levels, a baseline.

Semantics (docs/DESIGN.md, "Metric semantics"): the confusion matrix ``C`` is true x predicted, ignored pixels are
never counted; ``IoU_c = C_cc / (row_c + col_c - C_cc)``; a class whose denominator is zero is NaN and left out of
every mean. Coarser levels (IDD level 2 and 1) are scored from the same matrix by summing its rows and columns into
the coarse groups, as the official IDD evaluation does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _as_confusion(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    counts = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square and non-empty, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"a confusion matrix holds integer counts, got dtype {counts.dtype}")
    if (counts < 0).any():
        raise ValueError("a confusion matrix cannot hold negative counts")
    return counts.astype(np.int64, copy=False)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator`` with NaN where the denominator is zero."""
    out = np.full(np.shape(denominator), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _mean_present(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def per_category_iou(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class IoU, C_cc / (row_c + col_c - C_cc); NaN for a class in neither references nor predictions."""
    counts = _as_confusion(confusion)
    hits = np.diag(counts)
    return _ratio(hits, counts.sum(axis=1) + counts.sum(axis=0) - hits)


def coarsen_confusion(confusion: np.ndarray | torch.Tensor, mapping: Mapping[int, int]) -> np.ndarray:
    """Sum the rows and columns of a fine confusion matrix into coarse groups given as ``{fine_id: coarse_id}``."""
    counts = _as_confusion(confusion)
    num_fine = counts.shape[0]
    missing = sorted(set(range(num_fine)) - {int(k) for k in mapping})
    if missing:
        raise ValueError(f"the coarse mapping has no group for fine classes {missing}")
    groups = np.array([int(mapping[fine]) for fine in range(num_fine)])
    if (groups < 0).any():
        raise ValueError(f"coarse ids must be non-negative, got {sorted(set(groups[groups < 0].tolist()))}")
    membership = np.zeros((num_fine, int(groups.max()) + 1), dtype=np.int64)
    membership[np.arange(num_fine), groups] = 1
    return membership.T @ counts @ membership


def constant_prediction_mean_iou(confusion: np.ndarray) -> float:
    """The mIoU of the best constant prediction (the most frequent true class everywhere): a floor to beat."""
    rows = np.asarray(confusion, dtype=np.float64).sum(axis=1)
    total, present = rows.sum(), np.count_nonzero(rows)
    # Predicting class c everywhere gives IoU_c = row_c / total, and 0 for every other class in the ground truth.
    return float(rows.max() / total / present) if total else float("nan")


def compute_segmentation_metrics(
    confusion: np.ndarray | torch.Tensor,
    id2label: Mapping[int, str] | None = None,
    coarser: Mapping[str, Mapping[int, int]] | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU and accuracy, pixel accuracy, mean accuracy, frequency-weighted IoU (+ coarser mIoUs).

    Per-class values are float64 arrays with NaN for classes whose denominator is zero; every mean leaves NaN out.
    With ``id2label``, also one float per class as ``iou_<name>`` and ``accuracy_<name>``. With ``coarser`` (e.g.
    ``LabelSet.coarser``), ``mean_iou_<level>`` and ``per_category_iou_<level>`` from the aggregated matrix.
    """
    counts = _as_confusion(confusion)
    num_labels = counts.shape[0]
    hits = np.diag(counts)
    reference_totals = counts.sum(axis=1)
    total = reference_totals.sum()
    iou = per_category_iou(counts)
    accuracy = _ratio(hits, reference_totals)
    # Classes with a NaN IoU have no reference pixels, hence zero weight.
    frequency = reference_totals / total if total else np.zeros(num_labels)
    results: dict[str, Any] = {
        "mean_iou": _mean_present(iou),
        "mean_accuracy": _mean_present(accuracy),
        "overall_accuracy": float(hits.sum() / total) if total else float("nan"),
        "frequency_weighted_iou": float(np.nansum(frequency * iou)) if total else float("nan"),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if id2label is not None:
        ids = {int(k) for k in id2label}
        if ids != set(range(num_labels)):
            raise ValueError(f"id2label must name the classes 0..{num_labels - 1}, got ids {sorted(ids)}")
        names = {int(k): str(v) for k, v in id2label.items()}
        for index in range(num_labels):
            results[f"iou_{names[index]}"] = float(iou[index])
            results[f"accuracy_{names[index]}"] = float(accuracy[index])
    for level, mapping in (coarser or {}).items():
        coarse_iou = per_category_iou(coarsen_confusion(counts, mapping))
        results[f"mean_iou_{level}"] = _mean_present(coarse_iou)
        results[f"per_category_iou_{level}"] = coarse_iou
    return results


def scalar_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Only the scalar entries of a metrics dict (what the Trainer logs), as Python floats."""
    return {key: float(value) for key, value in results.items() if np.ndim(value) == 0}
