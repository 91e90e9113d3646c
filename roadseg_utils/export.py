"""Predictions written as IDD label files, `<sequence>/<frame>_gtFine_labellevel<N>Ids.png`, as IDD's tools read.

Beside them, ``ground_truth/`` holds the ground truth of exactly the exported frames, under the same names (what
the official script needs as ``--gts``: a split carved from train would otherwise leave it pointing at a gtFine
folder with frames that have no prediction), and ``README.md`` the official command line for this export.

The export is written into ``<name>.partial/predictions`` beside the ``--export_predictions`` folder and swapped in
whole at the end (`StagedExport`), so until then an earlier export stays intact, and a reader never finds one that
mixes two runs or lacks files yet looks complete. A killed run leaves only ``<name>.partial``, which the next run
into the same folder removes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image

from .atomic import write_atomically
from .data import idd_frame_name, idd_label_suffix
from .evaluation import OUTPUT_NAMES, EvalInputError
from .labels import LabelSet
from .output_dir import OutputLock, prepare_output_dir

EXPORT_FILE = re.compile(r"_gtFine_label(level\d)?Ids\.png$")
PARTIAL_SUFFIX = ".partial"
GROUND_TRUTH_DIR = "ground_truth"
README_FILE = "README.md"
OFFICIAL_SCRIPT = "https://github.com/AutoNUE/public-code"


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
) -> list[tuple[Path, Path]]:
    """Per image, its prediction's file ``<export_dir>/<sequence>/<frame><suffix>`` and its ground truth's file
    (the same under ``ground_truth/``); two images on one file is an error."""
    targets = []
    seen: dict[Path, str] = {}
    for path, sequence in zip(paths, sequences, strict=True):
        if sequence == GROUND_TRUTH_DIR:
            raise EvalInputError(f"{path}: its sequence folder {sequence!r} would collide with the exported ground "
                                 "truth's folder")
        relative = Path(sequence) / f"{idd_frame_name(path)}{export_suffix(level)}"
        target = export_dir / relative
        if target in seen:
            raise EvalInputError(f"{seen[target]} and {path} would both be exported as {target}")
        seen[target] = path
        targets.append((target, export_dir / GROUND_TRUTH_DIR / relative))
    return targets


def export_readme(target: Path, num_frames: int, level: int | None, model: str, split: str, source: str) -> str:
    """README.md of an export: what the files are, and the official script's command line for them."""
    folder = target.expanduser().resolve()
    suffix = export_suffix(level)
    lines = [
        f"# {num_frames} predictions of {model}", "",
        f"Written by roadseg's run_eval.py for the {split} split of {source}.", "",
        f"- `<sequence>/<frame>{suffix}`: the predicted label ids (uint8 PNG, the size of the original frame).",
        f"- `{GROUND_TRUTH_DIR}/<sequence>/<frame>{suffix}`: the ground truth run_eval.py scored them against, for "
        "exactly these frames (255 = ignored).", "",
    ]
    if level == 3:
        lines += [
            f"Score them with the official AutoNUE script ({OFFICIAL_SCRIPT}), from its checkout:", "",
            f"    python evaluation/evaluate_mIoU.py --gts {shlex.quote(str(folder / GROUND_TRUTH_DIR))} "
            f"--preds {shlex.quote(str(folder))} --num-workers 8", "",
            "It resizes every frame to 1280x720 before counting (`--res 1080`, `480` or `240` for other sizes), as "
            "`run_eval.py --protocol idd` does. Its level-1 figure applies the level-1 groups of level-2 ids to the "
            "level-3 matrix, so it differs from roadseg's level-1 mIoU (see roadseg's README).",
        ]
    else:
        lines.append(f"The official AutoNUE script ({OFFICIAL_SCRIPT}) reads level-3 files only; export with "
                     "`--export_level 3` to score with it.")
    return "\n".join(lines) + "\n"


def write_prediction(prediction: np.ndarray, lookup: np.ndarray | None, target: Path) -> Path:
    """Write a uint8 label map, through ``lookup`` when given, as a greyscale PNG at ``target`` (atomically)."""
    exported = Image.fromarray(prediction if lookup is None else lookup[prediction])
    return write_atomically(target, lambda stream: exported.save(stream, format="PNG"))


class StagedExport:
    """``--export_predictions``: checked and locked before any work, written aside, swapped in whole by `swap_in`.

    ``with StagedExport(target, output_dir, script) as export:`` raises `EvalInputError` (one line) for a target
    that is a file, is ``output_dir``, holds it or one of its outputs, or holds anything but exported predictions
    (the folder is replaced as a whole), and `OutputDirError` where the staging folder cannot be created or written
    or another run holds it; ``export.folder`` is then an empty folder to write into. Leaving the block removes the
    staging folder.
    """

    def __init__(self, target: str | os.PathLike[str], output_dir: str | os.PathLike[str], script: str) -> None:
        self.target = Path(target).expanduser()
        self.output_dir = Path(output_dir).expanduser()
        self.root = self.target.with_name(self.target.name + PARTIAL_SUFFIX)
        self.folder = self.root / "predictions"
        self._lock = OutputLock(self.root, script)

    def _check_target(self) -> None:
        target, output_dir = self.target.resolve(), self.output_dir.resolve()
        if (target == output_dir or target in output_dir.parents
                or (target.parent == output_dir and target.name in OUTPUT_NAMES)):
            raise EvalInputError(f"--export_predictions {self.target}: would replace --output_dir {self.output_dir} "
                                 "or its outputs; pick another folder")
        if self.target.is_file():
            raise EvalInputError(f"--export_predictions {self.target}: is a file, not a folder")
        if not self.target.is_dir():
            return
        for path in self.target.rglob("*"):
            if path.is_symlink() or (path.is_file() and not EXPORT_FILE.search(path.name)
                                     and path != self.target / README_FILE):
                raise EvalInputError(
                    f"--export_predictions {self.target}: holds {path.relative_to(self.target)}, which is not an "
                    "exported prediction; the folder is replaced as a whole, so pick a new or empty folder"
                )

    def __enter__(self) -> StagedExport:
        self._check_target()
        prepare_output_dir(self.root, "--export_predictions")
        self._lock.__enter__()
        try:
            # What a killed run left here is incomplete: start again from nothing.
            for leftover in (self.folder, self.root / "previous"):
                shutil.rmtree(leftover, ignore_errors=True)
            self.folder.mkdir()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def swap_in(self) -> Path:
        """Put the finished export in place of the target (the earlier export goes, never half of it)."""
        previous = self.root / "previous"
        if self.target.exists() or self.target.is_symlink():
            os.rename(self.target, previous)
        os.rename(self.folder, self.target)
        return self.target

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # The staging folder goes with its lock held, finished or not: a failed run leaves nothing behind.
        shutil.rmtree(self.root, ignore_errors=True)
        self._lock.__exit__(exc_type, exc, traceback)
