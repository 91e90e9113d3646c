"""Predictions written as IDD label files, `<sequence>/<frame>_gtFine_labellevel<N>Ids.png`, as IDD's tools read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import write_atomically
from .data import idd_frame_name, idd_label_suffix
from .evaluation import EvalInputError
from .labels import LabelSet


def export_suffix(level: int | None) -> str:
    """File ending of an exported prediction: the IDD ``_gtFine_labellevel<N>Ids.png`` (or ``_gtFine_labelIds.png``)."""
    return idd_label_suffix(level) if level is not None else "_gtFine_labelIds.png"


def export_lookup(label_set: LabelSet, export_level: int | None) -> tuple[np.ndarray | None, int | None]:
    """A 256-entry table from the model's ids to the export level's (None: keep them), and that level."""
    model_level = label_set.idd_level
    if export_level is None or export_level == model_level:
        return None, model_level
    if model_level is None:
        raise EvalInputError(f"--export_level needs an IDD label set; the model's label set is {label_set.name}")
    key = f"level{export_level}"
    if key not in label_set.coarser:
        raise EvalInputError(
            f"cannot export level-{export_level} ids from a level-{model_level} model (only coarser levels: "
            f"{', '.join(sorted(label_set.coarser)) or 'none'})"
        )
    return label_set.lookup_to(key), export_level


def export_paths(
    export_dir: Path, paths: Sequence[str], sequences: Sequence[str], level: int | None
) -> list[Path]:
    """``<export_dir>/<sequence>/<frame><suffix>`` for every image; two images on one file is an error."""
    targets = [export_dir / sequence / f"{idd_frame_name(path)}{export_suffix(level)}"
               for path, sequence in zip(paths, sequences, strict=True)]
    seen: dict[Path, str] = {}
    for target, path in zip(targets, paths, strict=True):
        if target in seen:
            raise EvalInputError(f"{seen[target]} and {path} would both be exported as {target}")
        seen[target] = path
    return targets


def write_prediction(prediction: np.ndarray, lookup: np.ndarray | None, target: Path) -> Path:
    """Write a uint8 label map, through ``lookup`` when given, as a greyscale PNG at ``target`` (atomically)."""
    exported = Image.fromarray(prediction if lookup is None else lookup[prediction])
    return write_atomically(target, lambda stream: exported.save(stream, format="PNG"))
