"""The IDD leaderboard's scoring protocol (AutoNUE ``evaluation/evaluate_mIoU.py``), counted beside the native one.

What the official script does, and what this module reproduces:

- every ground-truth and predicted map is resized to one frame (``--res 720``: 1280x720; 1080: 1920x1080, 480:
  858x480, 240: 426x240) with PIL's nearest-neighbour resize when it is not that size already, so every frame
  weighs the same (natively a 1920x1080 frame weighs 2.25 times a 1280x720 one);
- a 27x27 confusion is counted: values 0..25 are the level-3 classes, anything else (255, or above 25) is class 26,
  "misc", in the ground truth and in the prediction alike;
- level 3: IoU_c = tp / (tp + fp + fn), fn = the whole row minus tp (a labelled pixel predicted as misc is a miss),
  fp = the column over the 26 labelled rows minus tp (misc ground truth never counts); the mIoU is the plain mean,
  NaN as soon as one class has a zero denominator;
- level 2: the 26x26 labelled block folded into the 16 level-2 groups, IoU = tp / (row + column - tp);
- level 1: the script folds the level-3 matrix with the level-1 -> level-2 groups, so it reads level-3 ids 0..15 as
  level-2 ids (cars count as road-side objects, fence as sky, ids 16..25 vanish). `level1_iou` folds by the official
  label table instead; `official_script_level1_iou` is the script's figure, to compare with published numbers.

Resizing goes through PIL itself, so the maps counted are the ones the official script counts, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .confusion import joint_counts_numpy
from .labels import LEVEL1_NAMES, LEVEL2_NAMES, LEVEL3_NAMES, idd_label_set

PROTOCOL_CHOICES = ("native", "idd")
# The official script's --res and the frame (width, height) it resizes to.
PROTOCOL_FRAMES = {1080: (1920, 1080), 720: (1280, 720), 480: (858, 480), 240: (426, 240)}
DEFAULT_RESOLUTION = 720
NUM_CLASSES = len(LEVEL3_NAMES)
MISC = NUM_CLASSES  # the official matrix's last row and column: 255 and any value above 25
MATRIX_NAMES = (*LEVEL3_NAMES, "misc")
# The official script's level-1 fold: its mapping_1_to_2 applied to the level-3 matrix (level-3 ids read as level 2).
OFFICIAL_SCRIPT_LEVEL1_GROUPS = ((0, 1), (2, 3), (4, 5), (6, 7, 8), (9, 10, 11, 12), (13, 14), (15,))
_LEVEL3 = idd_label_set(3)
# The level-3 ids of each level-2 group (the official mapping_2_to_3) and of each level-1 group (the label table).
LEVEL2_GROUPS = tuple(tuple(i for i in range(NUM_CLASSES) if _LEVEL3.coarser["level2"][i] == group)
                      for group in range(len(LEVEL2_NAMES)))
LEVEL1_GROUPS = tuple(tuple(i for i in range(NUM_CLASSES) if _LEVEL3.coarser["level1"][i] == group)
                      for group in range(len(LEVEL1_NAMES)))
NAN_NOTE = (
    "mean_iou is the official figure: the plain mean over every class, null (NaN in the official script) when a "
    "class has no pixel in either the ground truth or the predictions; mean_iou_present_classes leaves such "
    "classes out."
)


def protocol_frame(resolution: int) -> tuple[int, int]:
    """The (width, height) every map is resized to for the official script's ``--res resolution``."""
    if resolution not in PROTOCOL_FRAMES:
        raise ValueError(f"the IDD protocol resolution must be one of {sorted(PROTOCOL_FRAMES)}, got {resolution!r}")
    return PROTOCOL_FRAMES[resolution]


def frame_name(resolution: int) -> str:
    """The protocol frame as ``WxH`` (``1280x720``)."""
    width, height = protocol_frame(resolution)
    return f"{width}x{height}"


def _uint8_map(values: Any, role: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{role} must be a 2-D label map, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{role} must hold integer class ids, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{role} hold values outside [0, 255] (min {array.min()}, max {array.max()})")
    return array.astype(np.uint8)


def resize_to_frame(label_map: Any, frame: tuple[int, int]) -> np.ndarray:
    """A uint8 label map resized to ``frame`` (width, height) by PIL's nearest neighbours, as the official script."""
    array = _uint8_map(label_map, "label map")
    if (array.shape[1], array.shape[0]) == tuple(frame):
        return array
    return np.asarray(Image.fromarray(array).resize(tuple(frame), resample=Image.NEAREST))


def fold_misc(joint: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """A (256, 256) value-pair histogram as the official (N+1)x(N+1) matrix: every value >= N counted as N (misc)."""
    columns = np.concatenate([joint[:, :num_classes], joint[:, num_classes:].sum(axis=1, keepdims=True)], axis=1)
    return np.concatenate([columns[:num_classes], columns[num_classes:].sum(axis=0, keepdims=True)], axis=0)


def official_confusion(prediction: Any, reference: Any, frame: tuple[int, int]) -> np.ndarray:
    """One frame's 27x27 official confusion (rows: ground truth), both maps resized to ``frame`` first."""
    predicted, truth = _uint8_map(prediction, "prediction"), _uint8_map(reference, "ground truth")
    if predicted.shape != truth.shape:
        raise ValueError(f"the prediction has shape {predicted.shape} but the ground truth has {truth.shape}")
    joint = joint_counts_numpy(resize_to_frame(predicted, frame), resize_to_frame(truth, frame))
    return fold_misc(joint)


class IddProtocolConfusion:
    """The official 27x27 confusion matrix (int64, rows: ground truth, last row and column: misc), frame by frame."""

    def __init__(self, resolution: int = DEFAULT_RESOLUTION) -> None:
        self.resolution = resolution
        self.frame = protocol_frame(resolution)
        self.matrix = np.zeros((NUM_CLASSES + 1, NUM_CLASSES + 1), dtype=np.int64)
        self.num_maps = 0

    def update(self, prediction: Any, reference: Any) -> IddProtocolConfusion:
        """Count one predicted map against its ground truth, both at their native (equal) size."""
        self.matrix += official_confusion(prediction, reference, self.frame)
        self.num_maps += 1
        return self


def _checked(matrix: np.ndarray) -> np.ndarray:
    counts = np.asarray(matrix)
    if counts.shape != (NUM_CLASSES + 1, NUM_CLASSES + 1) or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"expected the official {NUM_CLASSES + 1}x{NUM_CLASSES + 1} integer matrix, got "
                         f"{counts.dtype} {counts.shape}")
    return counts.astype(np.int64, copy=False)


def _iou(tp: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(tp.shape, np.nan)
    np.divide(tp, denominator, out=out, where=denominator > 0)
    return out


def fold_groups(matrix: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """The official ``higher_level_mat``: entry (x, y) sums ``matrix`` over the ids of group x and of group y."""
    membership = np.zeros((matrix.shape[0], len(groups)), dtype=np.int64)
    for group, ids in enumerate(groups):
        membership[list(ids), group] = 1
    return membership.T @ matrix @ membership


def generalized_iou(matrix: np.ndarray) -> np.ndarray:
    """The official ``generalized_eval_ious``: tp / (row + column - tp) for every class; NaN where that is 0."""
    tp = np.diag(matrix)
    return _iou(tp, matrix.sum(axis=1) + matrix.sum(axis=0) - tp)


def official_level3_iou(matrix: np.ndarray) -> np.ndarray:
    """The official ``eval_ious``: 26 level-3 IoUs, misc predictions as misses, misc ground truth never a false hit."""
    counts = _checked(matrix)
    tp = np.diag(counts)[:NUM_CLASSES]
    false_negatives = counts[:NUM_CLASSES].sum(axis=1) - tp
    false_positives = counts[:NUM_CLASSES, :NUM_CLASSES].sum(axis=0) - tp
    return _iou(tp, tp + false_positives + false_negatives)


def official_level2_iou(matrix: np.ndarray) -> np.ndarray:
    """The official level-2 IoUs (16): the level-3 matrix folded by level-2 group, misc left out."""
    return generalized_iou(fold_groups(_checked(matrix), LEVEL2_GROUPS))


def level1_iou(matrix: np.ndarray) -> np.ndarray:
    """Level-1 IoUs (7) folded by the official label table, as the script folds level 2 (misc left out)."""
    return generalized_iou(fold_groups(_checked(matrix), LEVEL1_GROUPS))


def official_script_level1_iou(matrix: np.ndarray) -> np.ndarray:
    """The official script's level-1 IoUs (7): level-3 ids 0..15 folded as if they were level-2 ids."""
    return generalized_iou(fold_groups(_checked(matrix), OFFICIAL_SCRIPT_LEVEL1_GROUPS))


def official_mean(iou: np.ndarray) -> float:
    """The official mIoU, ``ious.mean()``: NaN when any class is NaN."""
    return float(np.mean(iou))


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _level_block(iou: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    present = iou[~np.isnan(iou)]
    return {
        "mean_iou": _number(official_mean(iou)),
        "mean_iou_present_classes": _number(present.mean()) if present.size else None,
        "classes_without_pixels": [name for name, value in zip(names, iou, strict=True) if np.isnan(value)],
        "per_class_iou": {name: _number(value) for name, value in zip(names, iou, strict=True)},
    }


def protocol_results(matrix: np.ndarray, resolution: int) -> dict[str, Any]:
    """The ``idd_protocol`` block of eval_results.json (JSON-safe: NaN written as null)."""
    counts = _checked(matrix)
    width, height = protocol_frame(resolution)
    script_level1 = _level_block(official_script_level1_iou(counts), LEVEL1_NAMES)
    script_level1["groups"] = {
        name: [LEVEL3_NAMES[i] for i in ids] for name, ids in zip(LEVEL1_NAMES, OFFICIAL_SCRIPT_LEVEL1_GROUPS,
                                                                 strict=True)
    }
    return {
        "protocol": "AutoNUE evaluation/evaluate_mIoU.py",
        "resolution": resolution,
        "frame": {"width": width, "height": height},
        "counted_pixels": int(counts.sum()),
        "labelled_pixels": int(counts[:NUM_CLASSES].sum()),
        "level3": _level_block(official_level3_iou(counts), LEVEL3_NAMES),
        "level2": _level_block(official_level2_iou(counts), LEVEL2_NAMES),
        "level1": _level_block(level1_iou(counts), LEVEL1_NAMES),
        "level1_official_script": script_level1,
        "note": NAN_NOTE + " level1 folds by the official label table; level1_official_script is the official "
        "script's level-1 figure, which folds the level-3 matrix with the level-2 groups (its groups are listed).",
        "matrix_classes": list(MATRIX_NAMES),
        "confusion_matrix": counts.tolist(),
    }
