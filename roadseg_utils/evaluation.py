"""Scoring a checkpoint on a split (run_eval.py): the label set to score with, shards, and the results it writes.

The outputs are written into a staging folder inside ``--output_dir`` and moved over an earlier run's only at the
end, under ``RUN_INCOMPLETE`` (`StagedOutputs`): a run killed while scoring leaves the earlier results whole, one
killed while moving leaves the marker, and a rerun of the same command ends with the same files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .atomic import write_text_atomically
from .data import dataset_column, idd_frame_name
from .labels import IDD_LEVELS, LEVEL3_NAMES, LabelSet, custom_label_set, get_label_set, idd_label_set
from .metrics import constant_prediction_mean_iou
from .output_dir import RUN_FILE, IncompleteMarker, OutputDirError, OutputLock, prepare_output_dir
from .protocol import frame_name
from .visualize import render_overlay, save_png_atomically, save_score_charts

OUTPUT_FILES = ("eval_results.json", "eval_report.md", "confusion_matrix.png", "per_class_iou.png")
OVERLAY_DIR = "overlays"
OUTPUT_NAMES = (*OUTPUT_FILES, OVERLAY_DIR)
STAGING_NAME = ".run_eval-staging"


class EvalInputError(ValueError):
    """Arguments or inputs that cannot be evaluated; the message is one line a user can act on."""


def class_names(id2label: Mapping[Any, str]) -> list[str]:
    """The class names of ``id2label`` in id order (keys may be ints or strings, as in a model config)."""
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def _describe(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} classes ({shown})"


def resolve_label_set(model_id2label: Mapping[Any, str], requested: str | None, model_name: str) -> LabelSet:
    """The label set to score with: ``requested`` if it matches the model's classes, else the one they name.

    Without a request, an IDD level whose names equal the model's is used (its colours and coarser levels come
    along); any other head becomes a custom label set. A request that disagrees with the model is an error
    naming both.
    """
    model_names = class_names(model_id2label)
    if requested is not None:
        label_set = get_label_set(requested)
        data_names = class_names(label_set.id2label)
        if data_names != model_names:
            which = ""
            if len(model_names) == len(data_names):
                differ = next(i for i, (ours, theirs) in enumerate(zip(model_names, data_names, strict=True))
                              if ours != theirs)
                which = f" (class {differ} is {model_names[differ]!r} in the model, {data_names[differ]!r} there)"
            raise EvalInputError(
                f"the model {model_name} predicts {_describe(model_names)} but the data's label set {label_set.name} "
                f"has {_describe(data_names)}{which}; pass the --label_set the model was trained with, or leave it out"
            )
        return label_set
    for level in IDD_LEVELS:
        candidate = idd_label_set(level)
        if class_names(candidate.id2label) == model_names:
            return candidate
    return custom_label_set(Path(model_name).name or model_name, dict(enumerate(model_names)))


def check_protocol(protocol: str, label_set: LabelSet) -> None:
    """Refuse ``--protocol idd`` for a model whose classes are not the 26 IDD level-3 classes, in their order."""
    if protocol == "idd" and class_names(label_set.id2label) != list(LEVEL3_NAMES):
        raise EvalInputError(
            f"--protocol idd scores IDD level-3 models only (the official script reads *_gtFine_labellevel3Ids.png), "
            f"but the model predicts {label_set.name} ({_describe(class_names(label_set.id2label))}); use "
            "--protocol native"
        )


def overlay_indices(num_items: int, num_overlays: int) -> list[int]:
    """``num_overlays`` image indices spread evenly over the split (first and last included)."""
    if num_items == 0 or num_overlays == 0:
        return []
    return sorted({int(v) for v in np.linspace(0, num_items - 1, min(num_overlays, num_items)).round()})


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (in dicts too), so the JSON written is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return value


def _finite(value: Any) -> float | None:
    return json_safe(float(value))


def build_results(
    confusion: np.ndarray, metrics: Mapping[str, Any], label_set: LabelSet, run: Mapping[str, Any]
) -> dict[str, Any]:
    """The eval_results.json payload: run facts, summary metrics, per-class rows and the confusion matrix.

    A matrix without a labelled pixel raises `EvalInputError`: every metric would be NaN, not a result to report.
    """
    pixels = confusion.sum(axis=1)
    total = int(pixels.sum())
    if total == 0:
        raise EvalInputError(
            f"{run.get('data', 'the data')}: the {run.get('split', 'scored')} split has no labelled pixel (every "
            "ground-truth pixel is 255 = ignore), so there is nothing to score"
        )
    per_class = [
        {
            "id": index,
            "name": label_set.id2label[index],
            "iou": _finite(metrics["per_category_iou"][index]),
            "accuracy": _finite(metrics["per_category_accuracy"][index]),
            "pixel_share": pixels[index] / total if total else None,
            "pixels": int(pixels[index]),
        }
        for index in range(label_set.num_labels)
    ]
    summary = {key: _finite(value) for key, value in metrics.items() if np.ndim(value) == 0
               and not key.startswith(("iou_", "accuracy_"))}
    coarse = {}
    for level, names in label_set.coarser_names.items():
        values = metrics.get(f"per_category_iou_{level}")
        if values is not None:
            coarse[level] = {names[i]: _finite(v) for i, v in enumerate(values)}
    return {
        **run,
        **summary,
        "per_class": per_class,
        "per_category_iou_coarser": coarse,
        "labelled_pixels": total,
        "constant_baseline_mean_iou": _finite(constant_prediction_mean_iou(confusion)),
        "confusion_matrix": confusion.tolist(),
    }


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def render_report(results: Mapping[str, Any]) -> str:
    """eval_report.md: a summary and the per-class table (IoU, accuracy, pixel share)."""
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        f"Data: `{results['data']}`, split **{results['split']}**, {results['num_images']} images, "
        f"label set {results['label_set']}; eval shortest edge {results['eval_shortest_edge'] or 'original'}, "
        f"working size {results['working_size'] or 'ground-truth size'}, TTA {results['tta']}, seed {results['seed']}.",
        "",
    ]
    skipped = results.get("skipped_images") or []
    if skipped:
        shown = ", ".join(f"`{path}`" for path in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        lines += [f"**{len(skipped)} image(s) skipped as bad samples** (`--on_bad_sample skip`): {shown}.", ""]
    lines += [
        "| metric | value (%) |",
        "| --- | ---: |",
        f"| mIoU | {_percent(results['mean_iou'])} |",
    ]
    for key, name in (("mean_iou_level2", "mIoU level 2"), ("mean_iou_level1", "mIoU level 1")):
        if key in results:
            lines.append(f"| {name} | {_percent(results[key])} |")
    lines += [
        f"| pixel accuracy | {_percent(results['overall_accuracy'])} |",
        f"| mean class accuracy | {_percent(results['mean_accuracy'])} |",
        f"| frequency-weighted IoU | {_percent(results['frequency_weighted_iou'])} |",
        "",
        "## Per class",
        "",
        "| id | class | IoU (%) | accuracy (%) | pixel share (%) |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in results["per_class"]:
        lines.append(f"| {row['id']} | {row['name']} | {_percent(row['iou'])} | {_percent(row['accuracy'])} | "
                     f"{_percent(row['pixel_share'])} |")
    lines += [
        "",
        "IoU = TP / (TP + FP + FN) over all pixels of the split; accuracy = TP / ground-truth pixels of the class; "
        "pixel share = the class's share of the labelled ground-truth pixels. Pixels labelled 255 are ignored. "
        "— marks a class absent from the ground truth (accuracy) or from both ground truth and predictions (IoU); "
        "it is left out of the means, while a class that is only predicted counts with IoU 0.",
        "",
    ]
    if results.get("idd_protocol"):
        lines += render_protocol_section(results["idd_protocol"])
    return "\n".join(lines)


PROTOCOL_LEVELS = (
    ("level3", "3"), ("level2", "2"), ("level1", "1"), ("level1_official_script", "1, as the official script folds it")
)


def render_protocol_section(block: Mapping[str, Any]) -> list[str]:
    """eval_report.md's section on the IDD official (leaderboard) protocol: what it does, its mIoUs and level-3 IoUs."""
    frame, resolution = frame_name(block["resolution"]), block["resolution"]
    missing = block["level3"]["classes_without_pixels"]
    lines = [
        f"## IDD official protocol ({frame})",
        "",
        f"Scored as the AutoNUE benchmark's `evaluation/evaluate_mIoU.py --res {resolution}` scores: every prediction "
        f"and ground-truth map is resized to {frame} (nearest neighbour) before counting, so every frame weighs the "
        "same. The scores above count each frame at its own size instead (a 1920x1080 frame weighs 2.25 times a "
        "1280x720 one), so the two differ on data with frames of several sizes.",
        "",
        "| level | official mIoU (%) | mIoU over classes present (%) |",
        "| --- | ---: | ---: |",
    ]
    for key, name in PROTOCOL_LEVELS:
        level = block[key]
        lines.append(f"| {name} | {_percent(level['mean_iou'])} | {_percent(level['mean_iou_present_classes'])} |")
    lines += [
        "",
        "The official mIoU is the plain mean over every class: one class with no pixel in either the ground truth or "
        "the predictions makes it NaN (—)"
        + (f"; here {len(missing)} level-3 class(es): {', '.join(missing)}" if missing else "")
        + ". The last column leaves such classes out. Level 1 folds the classes by the official label table; the "
        "official script folds the level-3 matrix with the level-1 -> level-2 groups, reading level-3 ids 0..15 as "
        "level-2 ids (cars count as road-side objects, classes 16..25 are dropped), so its level-1 figure differs.",
        "",
        "| id | class | IoU (%), official protocol |",
        "| ---: | --- | ---: |",
    ]
    for index, (name, iou) in enumerate(block["level3"]["per_class_iou"].items()):
        lines.append(f"| {index} | {name} | {_percent(iou)} |")
    return [*lines, ""]


def protocol_summary(results: Mapping[str, Any]) -> str:
    """One line of the IDD protocol's official mIoUs for the run's summary; empty without the protocol."""
    block = results.get("idd_protocol")
    if not block:
        return ""
    values = [block[key]["mean_iou"] for key in ("level3", "level2", "level1")]
    shown = ["NaN" if value is None else f"{100 * value:.2f}%" for value in values]
    present = block["level3"]["mean_iou_present_classes"]
    if values[0] is None and present is not None:
        shown[0] = f"NaN ({100 * present:.2f}% over the classes present)"
    note = " (NaN: a class without pixels, see eval_report.md)" if None in values else ""
    return (f"IDD official protocol ({frame_name(block['resolution'])}): mIoU {shown[0]}, level 2 {shown[1]}, "
            f"level 1 {shown[2]}{note}\n")


def write_outputs(
    output_dir: Path,
    results: Mapping[str, Any],
    matrix: np.ndarray,
    metrics: Mapping[str, Any],
    label_set: LabelSet,
    dataset: Any,
    overlays: Sequence[int],
    overlay_predictions: Mapping[int, np.ndarray],
) -> None:
    """eval_results.json, eval_report.md, the confusion matrix and IoU chart, and the overlays of ``dataset``.

    An overlay index without a prediction (a sample skipped as bad) gets no picture.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "eval_results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(output_dir / "eval_report.md", render_report(results))
    title = f"{results['model']} on {results['split']} ({results['num_images']} images)"
    save_score_charts(
        matrix, metrics, label_set, title, output_dir / "confusion_matrix.png", output_dir / "per_class_iou.png"
    )
    paths = dataset_column(dataset, "path")
    for rank, index in enumerate(overlays):
        if index not in overlay_predictions:
            continue
        row = dataset[index]
        picture = render_overlay(np.asarray(row["image"]), row["label"], overlay_predictions[index], label_set)
        save_png_atomically(picture, output_dir / "overlays" / f"{rank:03d}_{idd_frame_name(paths[index])}.png")


class StagedOutputs:
    """``--output_dir`` checked and locked before any work, written into a staging folder, moved in by `commit`.

    ``with StagedOutputs(folder, script) as outputs:`` raises `OutputDirError` (one line) for a folder that is a
    file, cannot be created or written, holds another script's outputs (its ``_roadseg_run.json`` says so) or is
    being written by another run; ``outputs.staging`` is then empty.
    Leaving the block removes the staging folder and releases the lock.
    """

    def __init__(self, output_dir: str | os.PathLike[str], script: str) -> None:
        self.folder = Path(output_dir).expanduser()
        self.staging = self.folder / STAGING_NAME
        self.script = script
        self._lock = OutputLock(self.folder, script)

    def _refuse_another_scripts_folder(self) -> None:
        try:
            owner = json.loads((self.folder / RUN_FILE).read_text(encoding="utf-8")).get("script")
        except (OSError, ValueError, AttributeError):
            return  # no record (or none readable): no other script claimed the folder
        if owner and owner != self.script:
            raise OutputDirError(f"--output_dir {self.folder}: holds the outputs of {owner} ({RUN_FILE}); write the "
                                 "evaluation into another folder, so the two never mix")

    def __enter__(self) -> StagedOutputs:
        prepare_output_dir(self.folder)
        self._refuse_another_scripts_folder()
        self._lock.__enter__()
        try:
            # A killed run's staged files are incomplete: start again from nothing.
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def commit(self, *first: Callable[[], object]) -> None:
        """Under ``RUN_INCOMPLETE``: call ``first`` (e.g. the export's swap), then put the staged outputs in place.

        An earlier run's output that this run did not write (overlays with ``--num_overlays 0``) goes too.
        """
        with IncompleteMarker(self.folder, self.script):
            for step in first:
                step()
            for name in OUTPUT_NAMES:
                old, new = self.folder / name, self.staging / name
                if old.is_dir() and not old.is_symlink():
                    os.rename(old, self.staging / f"{name}.previous")
                elif old.exists() and not new.exists():
                    old.unlink()
                if new.exists():
                    os.replace(new, old)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.__exit__(exc_type, exc, traceback)
