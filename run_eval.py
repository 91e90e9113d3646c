#!/usr/bin/env python
"""Score a Mask2Former checkpoint on a labelled split at full resolution: metrics, report, pictures, IDD-format PNGs.

    python run_eval.py --model_name_or_path runs/ft --data_dir data/syn --output_dir runs/ev
    python run_eval.py eval_args.json
    accelerate launch run_eval.py --model_name_or_path runs/ft --data_dir data/syn --output_dir runs/ev

Predictions are scored at the original size of each ground-truth map: mask logits are upsampled straight to that
size (or to ``--working_size`` and then resized with nearest neighbours), never through the fixed 384x384 step of
the upstream ``post_process_semantic_segmentation``. Under ``accelerate launch`` every process scores its own
shard of the split (no sample twice), the confusion matrices are summed across processes, and only the main
process writes files.
"""

from __future__ import annotations

import os

# albumentations asks PyPI for a newer release on import; offline that only costs time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import json  # noqa: E402
import logging as std_logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from huggingface_hub import EvalResult  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import HfArgumentParser, set_seed  # noqa: E402
from transformers.utils import logging  # noqa: E402

from roadseg_utils.atomic import write_text_atomically  # noqa: E402
from roadseg_utils.cli import one_line  # noqa: E402
from roadseg_utils.collator import SegmentationCollator  # noqa: E402
from roadseg_utils.data import (  # noqa: E402
    SPLIT_ALIASES,
    DataError,
    DataSourceArguments,
    dataset_column,
    idd_frame_name,
    idd_label_suffix,
    label_level,
    load_segmentation_dataset,
    with_sample_transform,
)
from roadseg_utils.hub import (  # noqa: E402
    HubPublishError,
    hub_is_reachable,
    push_files_to_hub,
    update_model_card_eval_results,
)
from roadseg_utils.labels import IDD_LEVELS, LabelSet, custom_label_set, get_label_set, idd_label_set  # noqa: E402
from roadseg_utils.metrics import (  # noqa: E402
    StreamingConfusionMatrix,
    all_reduce_confusion,
    compute_segmentation_metrics,
    constant_prediction_mean_iou,
)
from roadseg_utils.modeling import (  # noqa: E402
    TINY_MODEL,
    ModelLoadError,
    load_image_processor,
    load_model,
    semantic_scores_for_image,
)
from roadseg_utils.transforms import build_eval_transforms, make_transform_fn  # noqa: E402
from roadseg_utils.visualize import render_overlay, save_png_atomically, save_score_charts  # noqa: E402

logger = logging.get_logger("run_eval")

TTA_CHOICES = ("none", "flip")
CARD_METRICS = {
    "mean_iou": "mIoU",
    "mean_iou_level2": "mIoU (level 2)",
    "mean_iou_level1": "mIoU (level 1)",
    "mean_accuracy": "Mean class accuracy",
    "overall_accuracy": "Pixel accuracy",
}


class EvalInputError(ValueError):
    """Arguments or inputs that cannot be evaluated; the message is one line a user can act on."""


@dataclass
class EvalArguments:
    """What to evaluate, how, and what to write (the data source comes from ``DataSourceArguments``)."""

    model_name_or_path: str = field(
        metadata={"help": "A saved model folder (config.json + weights), a Hub model id, or 'tiny' (offline demo)."}
    )
    output_dir: str = field(metadata={"help": "Folder for eval_results.json, eval_report.md, plots and overlays."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    split: str = field(
        default="test",
        metadata={"help": "Split to score: test (default), validation or train, built by the same split logic and "
                  "--seed as fine-tuning."},
    )
    batch_size: int = field(default=4, metadata={"help": "Images per forward pass (per process)."})
    eval_size: int | None = field(
        default=None,
        metadata={"help": "Shortest image edge fed to the model (aspect kept). Default: the checkpoint's image "
                  "processor size (shortest_edge); 0 feeds the original size."},
    )
    working_size: int | None = field(
        default=None,
        metadata={"help": "Cap on the shortest edge at which mask logits are upsampled and scored; the label map "
                  "is then resized to the ground-truth size with nearest neighbours. Default: the ground-truth "
                  "size itself (saves memory at 1080p when set, e.g. 540)."},
    )
    tta: str = field(
        default="none",
        metadata={"help": "Test-time augmentation: none, or flip (average class scores of the image and its "
                  "horizontal mirror).", "choices": list(TTA_CHOICES)},
    )
    num_overlays: int = field(
        default=8, metadata={"help": "Number of image | ground truth | prediction pictures written to overlays/."}
    )
    export_predictions: str | None = field(
        default=None,
        metadata={"help": "Folder receiving <sequence>/<frame>_gtFine_labellevel<N>Ids.png predictions at the "
                  "original size, the layout the official IDD evaluation reads."},
    )
    export_level: int | None = field(
        default=None,
        metadata={"help": "IDD level (1-4) of the exported ids; at most the model's level (default: the model's)."},
    )
    update_model_card: bool = field(
        default=False,
        metadata={"help": "Write the results as model-index metadata into the checkpoint's README.md (a Hub "
                  "model's card is written to --output_dir/README.md)."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Push the updated model card, eval_results.json, eval_report.md and the plots to "
                  "--hub_model_id (implies --update_model_card)."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repository to push to (default: --model_name_or_path when it is a Hub id)."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the stored login / HF_TOKEN); never logged or written."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    seed: int = field(default=42, metadata={"help": "Seed of the split (use the fine-tuning seed) and of 'tiny'."})
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "Processes that decode and resize images while the model runs (0: inline)."}
    )

    def __post_init__(self) -> None:
        canonical = SPLIT_ALIASES.get(self.split.lower())
        if canonical is None:
            raise EvalInputError(f"--split must be test, validation or train, got {self.split!r}")
        self.split = canonical
        if self.tta not in TTA_CHOICES:
            raise EvalInputError(f"--tta must be one of {', '.join(TTA_CHOICES)}, got {self.tta!r}")
        for name in ("batch_size", "working_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalInputError(f"--{name} must be at least 1, got {value}")
        for name in ("eval_size", "num_overlays", "dataloader_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise EvalInputError(f"--{name} must not be negative, got {value}")
        if self.export_level is not None and self.export_level not in IDD_LEVELS:
            raise EvalInputError(f"--export_level must be one of {IDD_LEVELS}, got {self.export_level}")
        if self.push_to_hub:
            self.update_model_card = True
        if self.update_model_card and self.model_name_or_path == TINY_MODEL:
            raise EvalInputError("--update_model_card needs a saved model folder or a Hub id, not 'tiny'")

    def __repr__(self) -> str:
        # The token must never reach a log line.
        shown = {k: ("<hidden>" if k == "hub_token" and v else v) for k, v in asdict(self).items()}
        return f"EvalArguments({shown})"


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[EvalArguments, DataSourceArguments, bool]:
    """The two argument dataclasses from the command line or one JSON file, and whether --label_set was given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((EvalArguments, DataSourceArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        payload = json.loads(Path(argv[0]).read_text())
        eval_args, data_args = parser.parse_dict(payload)
        return eval_args, data_args, "label_set" in payload
    # A None default tells "not given" apart from an explicit --label_set idd-level3.
    parser.set_defaults(label_set=None)
    eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    return eval_args, data_args, data_args.label_set is not None


# ---------------------------------------------------------------------------------------------------------
# Model and label set


def _names(id2label: Mapping[Any, str]) -> list[str]:
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
    model_names = _names(model_id2label)
    if requested is not None:
        label_set = get_label_set(requested)
        data_names = _names(label_set.id2label)
        if data_names != model_names:
            raise EvalInputError(
                f"the model {model_name} predicts {_describe(model_names)} but the data's label set {label_set.name} "
                f"has {_describe(data_names)}; pass the --label_set the model was trained with, or leave it out"
            )
        return label_set
    for level in IDD_LEVELS:
        candidate = idd_label_set(level)
        if _names(candidate.id2label) == model_names:
            return candidate
    return custom_label_set(Path(model_name).name or model_name, dict(enumerate(model_names)))


def processor_shortest_edge(processor: Any) -> int | None:
    """The shortest edge an image processor resizes to, or None when it has none."""
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(min(get("height"), get("width")))
    return None


# ---------------------------------------------------------------------------------------------------------
# Sharding, batching and prediction


def shard_positions(num_items: int, num_processes: int, process_index: int) -> tuple[list[int], int]:
    """This process's item indices (strided) padded to the same length on every process, and how many are real.

    Every process then runs the same number of batches, so per-batch collectives line up; the padding repeats
    a real index and is never counted.
    """
    mine = list(range(process_index, num_items, num_processes))
    length = math.ceil(num_items / num_processes)
    filler = mine[-1] if mine else 0
    return mine + [filler] * (length - len(mine)), len(mine)


class EvalCollator:
    """The project collator, padded to a multiple of the model's stride, without the training-only mask targets."""

    def __init__(self, size_divisor: int) -> None:
        self.collator = SegmentationCollator(with_targets=False, size_divisor=max(1, int(size_divisor)))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pixel values and mask padded to the divisor, the valid (h, w) of each image, and the originals."""
        batch = self.collator(examples)
        return {
            "pixel_values": batch["pixel_values"],
            "pixel_mask": batch["pixel_mask"],
            "valid_sizes": [tuple(np.asarray(example["label"]).shape) for example in examples],
            "original_images": batch["original_images"],
            "original_segmentation_maps": batch["original_segmentation_maps"],
        }


def working_target(target_size: tuple[int, int], working_size: int | None) -> tuple[int, int]:
    """``target_size`` shrunk (aspect kept) so its shortest edge is at most ``working_size``."""
    height, width = target_size
    if working_size is None or min(height, width) <= working_size:
        return height, width
    scale = working_size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def predict_batch(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    accelerator: Accelerator,
    tta: str = "none",
    working_size: int | None = None,
) -> list[torch.Tensor]:
    """uint8 label maps on the model's device, one per image at its ground-truth size."""
    device = accelerator.device
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
    if tta == "flip":
        pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        pixel_mask = torch.cat([pixel_mask, pixel_mask.flip(-1)])
    with accelerator.autocast():
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    class_logits = outputs.class_queries_logits.float()
    mask_logits = outputs.masks_queries_logits.float()
    input_size = tuple(pixel_values.shape[-2:])
    num_images = len(batch["valid_sizes"])
    maps = []
    for index, (valid_size, label) in enumerate(zip(batch["valid_sizes"], batch["original_segmentation_maps"],
                                                    strict=True)):
        target_size = tuple(np.asarray(label).shape)
        size = working_target(target_size, working_size)
        scores = semantic_scores_for_image(class_logits[index], mask_logits[index], size, valid_size, input_size)
        if tta == "flip":
            # Mirroring the mirrored masks back puts the padding on the right again, where the crop expects it.
            mirrored = mask_logits[num_images + index].flip(-1)
            scores += semantic_scores_for_image(class_logits[num_images + index], mirrored, size, valid_size,
                                                input_size)
        prediction = scores.argmax(dim=0).to(torch.uint8)
        if size != target_size:
            prediction = torch.nn.functional.interpolate(
                prediction[None, None].float(), size=target_size, mode="nearest-exact"
            )[0, 0].to(torch.uint8)
        maps.append(prediction)
    return maps


# ---------------------------------------------------------------------------------------------------------
# Outputs


def export_suffix(level: int | None) -> str:
    """File ending of an exported prediction: the IDD ``_gtFine_labellevel<N>Ids.png`` (or ``_gtFine_labelIds.png``)."""
    return idd_label_suffix(level) if level is not None else "_gtFine_labelIds.png"


def export_lookup(label_set: LabelSet, export_level: int | None) -> tuple[np.ndarray | None, int | None]:
    """A 256-entry table from the model's ids to the export level's (None: keep them), and that level."""
    model_level = label_level(label_set)
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


def overlay_indices(num_items: int, num_overlays: int) -> list[int]:
    """``num_overlays`` image indices spread evenly over the split (first and last included)."""
    if num_items == 0 or num_overlays == 0:
        return []
    return sorted({int(v) for v in np.linspace(0, num_items - 1, min(num_overlays, num_items)).round()})


def _finite(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def build_results(
    confusion: np.ndarray, metrics: Mapping[str, Any], label_set: LabelSet, run: Mapping[str, Any]
) -> dict[str, Any]:
    """The eval_results.json payload: run facts, summary metrics, per-class rows and the confusion matrix."""
    pixels = confusion.sum(axis=1)
    total = int(pixels.sum())
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
        f"label set {results['label_set']}; eval size {results['eval_size'] or 'original'}, "
        f"working size {results['working_size'] or 'ground-truth size'}, TTA {results['tta']}, seed {results['seed']}.",
        "",
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
    return "\n".join(lines)


def card_eval_results(results: Mapping[str, Any], dataset_id: str, dataset_name: str) -> list[EvalResult]:
    """model-index entries (image-segmentation) for the summary metrics of ``results``."""
    entries = []
    for key, name in CARD_METRICS.items():
        value = results.get(key)
        if value is None:
            continue
        entries.append(EvalResult(
            task_type="image-segmentation",
            task_name="Semantic segmentation",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_config=results["label_set"],
            dataset_split=results["split"],
            metric_type=key,
            metric_name=name,
            metric_value=round(float(value), 6),
        ))
    return entries


# ---------------------------------------------------------------------------------------------------------
# Main


def evaluate(eval_args: EvalArguments, data_args: DataSourceArguments, label_set_given: bool) -> dict[str, Any]:
    """Load, predict, score and write every output; returns the eval_results.json payload."""
    accelerator = Accelerator()
    is_main = accelerator.is_main_process
    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for logger_name in ("run_eval", "roadseg_utils"):
        std_logging.getLogger(logger_name).setLevel(std_logging.INFO if is_main else std_logging.WARNING)
    set_seed(eval_args.seed)
    name = eval_args.model_name_or_path
    if eval_args.push_to_hub:
        # Fail before the evaluation, not after it.
        if eval_args.hub_model_id is None and Path(name).expanduser().is_dir():
            raise EvalInputError("--push_to_hub needs --hub_model_id for a local model folder")
        if not hub_is_reachable():
            raise EvalInputError("--push_to_hub: the Hugging Face Hub is not reachable (offline?)")
    if name == TINY_MODEL:
        label_set = get_label_set(data_args.label_set or "idd-level3")
        model = load_model(name, label_set)
    else:
        model = load_model(name, None, eval_args.model_revision, eval_args.hub_token, eval_args.cache_dir)
        label_set = resolve_label_set(model.config.id2label, data_args.label_set if label_set_given else None, name)
    processor = load_image_processor(name)
    eval_size = processor_shortest_edge(processor) if eval_args.eval_size is None else eval_args.eval_size or None
    lookup, export_level = export_lookup(label_set, eval_args.export_level)

    splits = load_segmentation_dataset(data_args, label_set, eval_args.seed)
    dataset = splits[eval_args.split]
    if len(dataset) == 0:
        raise EvalInputError(f"{data_args.describe_source()}: the {eval_args.split} split has no labelled images")
    paths = dataset_column(dataset, "path")
    sequences = dataset_column(dataset, "sequence")
    export_dir = Path(eval_args.export_predictions) if eval_args.export_predictions else None
    targets = export_paths(export_dir, paths, sequences, export_level) if export_dir else None
    overlays = overlay_indices(len(dataset), eval_args.num_overlays)
    logger.info(f"scoring {name} ({label_set.name}, {label_set.num_labels} classes) on {len(dataset)} "
                f"{eval_args.split} images of {data_args.describe_source()}; eval size {eval_size or 'original'}, "
                f"TTA {eval_args.tta}, {accelerator.num_processes} process(es) on {accelerator.device}")

    transform = make_transform_fn(build_eval_transforms(eval_size, processor.image_mean, processor.image_std))
    positions, num_real = shard_positions(len(dataset), accelerator.num_processes, accelerator.process_index)
    loader = torch.utils.data.DataLoader(
        with_sample_transform(dataset, transform),
        batch_size=eval_args.batch_size,
        sampler=positions,
        collate_fn=EvalCollator(getattr(processor, "size_divisor", None) or 32),
        num_workers=eval_args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    model.to(accelerator.device).eval()
    confusion = StreamingConfusionMatrix(label_set.num_labels, device=accelerator.device)
    wanted = set(overlays) | (set(range(len(dataset))) if targets else set())
    overlay_predictions: dict[int, np.ndarray] = {}
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=2) as writer, torch.inference_mode():
        for step, batch in enumerate(tqdm(loader, desc="evaluating", disable=not accelerator.is_local_main_process)):
            start = step * eval_args.batch_size
            real = max(0, min(len(batch["valid_sizes"]), num_real - start))
            predictions = predict_batch(model, batch, accelerator, eval_args.tta, eval_args.working_size)
            if real:
                confusion.update(predictions[:real], batch["original_segmentation_maps"][:real])
            kept = [(positions[start + i], predictions[i].cpu().numpy()) for i in range(real)
                    if positions[start + i] in wanted]
            if wanted and accelerator.num_processes > 1:
                kept = gather_object(kept)
            if not is_main:
                continue
            for index, prediction in kept:
                if index in overlays:
                    overlay_predictions[index] = prediction
                if targets:
                    exported = prediction if lookup is None else lookup[prediction]
                    writes.append(writer.submit(save_png_atomically, Image.fromarray(exported), targets[index]))
        for write in writes:
            write.result()

    matrix = all_reduce_confusion(confusion.matrix_tensor, accelerator).cpu().numpy()
    metrics = compute_segmentation_metrics(matrix, label_set.id2label, label_set.coarser)
    run = {
        "model": name,
        "data": data_args.describe_source(),
        "split": eval_args.split,
        "num_images": len(dataset),
        "label_set": label_set.name,
        "num_labels": label_set.num_labels,
        "class_names": _names(label_set.id2label),
        "seed": eval_args.seed,
        "eval_size": eval_size,
        "working_size": eval_args.working_size,
        "tta": eval_args.tta,
        "num_processes": accelerator.num_processes,
        "export_predictions": str(export_dir) if export_dir else None,
        "export_level": export_level if export_dir else None,
    }
    results = build_results(matrix, metrics, label_set, run)
    if is_main:
        write_outputs(results, matrix, metrics, label_set, dataset, overlays, overlay_predictions, eval_args)
        output_dir = Path(eval_args.output_dir)
        print(
            f"{eval_args.split} mIoU {results['mean_iou']:.4f} on {len(dataset)} images "
            f"(best constant prediction: {results['constant_baseline_mean_iou']:.4f})\n"
            f"results: {output_dir / 'eval_results.json'}, {output_dir / 'eval_report.md'}\n"
            f"pictures: {output_dir / 'overlays'}/, {output_dir / 'confusion_matrix.png'}, "
            f"{output_dir / 'per_class_iou.png'}"
        )
        if eval_args.update_model_card:
            publish_results(results, eval_args, data_args)
    accelerator.wait_for_everyone()
    return results


def write_outputs(
    results: Mapping[str, Any],
    matrix: np.ndarray,
    metrics: Mapping[str, Any],
    label_set: LabelSet,
    dataset: Any,
    overlays: Sequence[int],
    overlay_predictions: Mapping[int, np.ndarray],
    eval_args: EvalArguments,
) -> None:
    """eval_results.json, eval_report.md, the confusion matrix and IoU chart, and the overlays."""
    output_dir = Path(eval_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "eval_results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(output_dir / "eval_report.md", render_report(results))
    title = f"{results['model']} on {results['split']} ({results['num_images']} images)"
    save_score_charts(
        matrix, metrics, label_set, title, output_dir / "confusion_matrix.png", output_dir / "per_class_iou.png"
    )
    paths = dataset_column(dataset, "path")
    for rank, index in enumerate(overlays):
        row = dataset[index]
        picture = render_overlay(np.asarray(row["image"]), row["label"], overlay_predictions[index], label_set)
        save_png_atomically(picture, output_dir / "overlays" / f"{rank:03d}_{idd_frame_name(paths[index])}.png")


def publish_results(results: Mapping[str, Any], eval_args: EvalArguments, data_args: DataSourceArguments) -> None:
    """Write the model-index into the checkpoint's card and, with --push_to_hub, push it with the result files."""
    name = eval_args.model_name_or_path
    local = Path(name).expanduser()
    card_path = local / "README.md" if local.is_dir() else Path(eval_args.output_dir) / "README.md"
    repo_id = eval_args.hub_model_id or (None if local.is_dir() else name)
    # The same dataset type and name as run_finetune.py's card, so a new result replaces an older one of its split.
    is_idd = results["label_set"].startswith("idd-")
    dataset_name = data_args.dataset_name or ("IDD" if is_idd else Path(data_args.describe_source()).name)
    card = update_model_card_eval_results(
        card_path,
        card_eval_results(results, "idd" if is_idd else "custom", dataset_name),
        model_name=repo_id or local.name,
        base_card_repo=None if local.is_dir() else name,
        token=eval_args.hub_token,
    )
    logger.info(f"wrote {len(card.data.eval_results or [])} model-index results into {card_path}")
    if not eval_args.push_to_hub:
        return
    output_dir = Path(eval_args.output_dir)
    files = {"README.md": card_path}
    for file_name in ("eval_results.json", "eval_report.md", "confusion_matrix.png", "per_class_iou.png"):
        files[f"eval/{results['split']}/{file_name}"] = output_dir / file_name
    url = push_files_to_hub(
        repo_id, files, token=eval_args.hub_token, private=eval_args.hub_private_repo,
        commit_message=f"Evaluation on {results['split']}: mIoU {results['mean_iou']:.4f}",
    )
    logger.info(f"pushed the model card and evaluation files to {url}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; bad input ends with one line on stderr and exit status 1."""
    try:
        eval_args, data_args, label_set_given = parse_arguments(argv)
        return evaluate(eval_args, data_args, label_set_given)
    except (EvalInputError, ModelLoadError, DataError, HubPublishError, FileNotFoundError) as err:
        print(f"run_eval.py: error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
