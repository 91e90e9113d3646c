"""Model cards: the card of a fine-tuned checkpoint, and model-index results merged into any card."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from . import hub
from .atomic import write_text_atomically
from .cli import one_line
from .labels import IGNORE_INDEX, LabelSet

CARD_TAGS = ("image-segmentation", "mask2former", "semantic-segmentation", "roadseg")
# The metrics of the card's results table, in its order.
CARD_SUMMARY_METRICS = (
    ("mean_iou", "mIoU"),
    ("mean_iou_level2", "mIoU (level 2)"),
    ("mean_iou_level1", "mIoU (level 1)"),
    ("overall_accuracy", "pixel accuracy"),
    ("mean_accuracy", "mean class accuracy"),
    ("frequency_weighted_iou", "frequency-weighted IoU"),
    ("loss", "loss"),
)
# The metrics of the model-index: metric type and name, for run_finetune.py's card and run_eval.py's results alike,
# so an evaluation replaces the card's earlier result of its split.
MODEL_INDEX_METRICS = (
    ("mean_iou", "mIoU"),
    ("mean_iou_level2", "mIoU (level 2)"),
    ("mean_iou_level1", "mIoU (level 1)"),
    ("mean_accuracy", "Mean class accuracy"),
    ("overall_accuracy", "Pixel accuracy"),
)
# run_eval.py --protocol idd: the IDD official protocol's mIoUs (levels 3, 2, 1 of its ``idd_protocol`` block) as
# entries of their own, told apart from the native ones by their metric config (``idd-official-1280x720``).
PROTOCOL_MODEL_INDEX_METRICS = (
    ("level3", "mean_iou", "mIoU"),
    ("level2", "mean_iou_level2", "mIoU level 2"),
    ("level1", "mean_iou_level1", "mIoU level 1"),
)
CARD_HYPERPARAMETERS = (
    "learning_rate", "lr_scheduler_type", "optim", "weight_decay", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_steps", "max_grad_norm", "seed",
)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def model_index_dataset_type(idd_level: int | None) -> str:
    """The model-index dataset type of a label set: ``idd`` when it has an IDD level, else ``custom``."""
    return "idd" if idd_level is not None else "custom"


def model_index_results(
    metrics: Mapping[str, Any], split: str, dataset_type: str, dataset_name: str, label_set_name: str
) -> list[EvalResult]:
    """model-index entries (image-segmentation) for the finite `MODEL_INDEX_METRICS` of one split's ``metrics``.

    With an ``idd_protocol`` block (run_eval.py's results), also its finite official mIoUs
    (`PROTOCOL_MODEL_INDEX_METRICS`), named after the protocol and its frame and set apart by their metric config.
    """
    entries = [(key, name, metrics.get(key), None) for key, name in MODEL_INDEX_METRICS]
    protocol = metrics.get("idd_protocol")
    if protocol:
        frame = f"{protocol['frame']['width']}x{protocol['frame']['height']}"
        entries += [(key, f"{name} (IDD official protocol, {frame})", protocol[level]["mean_iou"],
                     f"idd-official-{frame}") for level, key, name in PROTOCOL_MODEL_INDEX_METRICS]
    return [
        EvalResult(
            task_type="image-segmentation",
            task_name="Semantic segmentation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=label_set_name,
            dataset_split=split,
            metric_type=key,
            metric_name=name,
            metric_config=config,
            metric_value=round(float(value), 6),
        )
        for key, name, value, config in entries
        if _finite(value)
    ]


def _eval_result_key(result: EvalResult) -> tuple[str | None, ...]:
    return (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split, result.metric_type,
            result.metric_config)


def merge_eval_results(existing: Iterable[EvalResult], new: Iterable[EvalResult]) -> list[EvalResult]:
    """``existing`` with every result for the same task, dataset, config, split, metric and metric config replaced.

    The metric config keeps a protocol's results (``idd-official-1280x720``) apart from the native ones.
    """
    new = list(new)
    replaced = {_eval_result_key(result) for result in new}
    return [result for result in existing if _eval_result_key(result) not in replaced] + new


def _load_card(card_path: Path, base_card_repo: str | None, token: str | None) -> ModelCard:
    if card_path.is_file():
        return ModelCard.load(card_path)
    if base_card_repo is not None:
        if not hub.hub_is_reachable():
            raise hub.HubPublishError(
                f"cannot read the model card of {base_card_repo}: the Hugging Face Hub is not reachable (offline?)"
            )
        try:
            return ModelCard.load(base_card_repo, token=token)
        except (HfHubHTTPError, OSError, ValueError) as err:
            message = f"cannot read the model card of {base_card_repo}: {one_line(err, token)}"
            raise hub.HubPublishError(message) from err
    data = ModelCardData(library_name="transformers", pipeline_tag="image-segmentation",
                         tags=["image-segmentation", "mask2former"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {card_path.parent.name or 'Model'}\n")


def update_model_card_eval_results(
    card_path: str | os.PathLike[str],
    eval_results: Iterable[EvalResult],
    model_name: str,
    base_card_repo: str | None = None,
    token: str | None = None,
) -> ModelCard:
    """Write ``eval_results`` into the model-index metadata of the card at ``card_path``, atomically.

    The card is read from ``card_path``, else from the Hub repo ``base_card_repo``, else started as a minimal card;
    its text and other metadata are kept, and earlier results for the same task, dataset, config, split and metric
    are replaced. The written file is parsed back and must give the same results (else ValueError).
    """
    card_path = Path(card_path)
    card = _load_card(card_path, base_card_repo, token)
    merged = merge_eval_results(card.data.eval_results or [], eval_results)
    card.data.model_name = card.data.model_name or model_name
    card.data.eval_results = merged
    write_text_atomically(card_path, str(card))
    written = ModelCard.load(card_path).data.eval_results or []
    if [(_eval_result_key(r), r.metric_value) for r in written] != [(_eval_result_key(r), r.metric_value)
                                                                    for r in merged]:
        raise ValueError(f"{card_path}: the model-index written does not read back as the results given")
    return card


# ---------------------------------------------------------------------------------------------------------
# The model card of a fine-tuned checkpoint (run_finetune.py)


@dataclass
class FinetuneCardInfo:
    """What the model card of a fine-tuned checkpoint states; ``metrics`` maps a split to its unprefixed scalars."""

    model_name: str
    label_set: LabelSet
    base_model: str | None = None
    data_source: str = ""
    dataset_name: str = "IDD"  # the model-index dataset name, e.g. the data folder's name
    split_sizes: Mapping[str, int] = field(default_factory=dict)
    split_description: str = ""
    selection: Mapping[str, Any] | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    frozen_modules: Sequence[str] = ()
    parameter_counts: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    plots: Sequence[str] = ()  # paths relative to the card's folder
    # Target class -> checkpoint class its head row started from (None: random), when the classes were remapped.
    head_initialisation: Mapping[str, str | None] | None = None
    packaged_base: str | None = None  # a checkpoint packaged with the suite (tiny-cityscapes)
    # "other": the weights inherit the terms of the base checkpoint and of the training data (see the card's text).
    license: str | None = "other"

    @property
    def dataset_type(self) -> str:
        """The model-index dataset type: ``idd`` for the IDD label sets, else ``custom``."""
        return model_index_dataset_type(self.label_set.idd_level)


def training_hyperparameters(training_args: Any) -> dict[str, Any]:
    """The `CARD_HYPERPARAMETERS` of ``TrainingArguments``, an enum as its value (``constant``, not an enum name)."""
    values = {name: getattr(training_args, name) for name in CARD_HYPERPARAMETERS}
    return {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}


def strip_prefix(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The ``prefix_``-keyed entries of ``metrics`` without the prefix (a split's metrics as the card takes them)."""
    return {key[len(prefix) + 1:]: value for key, value in metrics.items() if key.startswith(prefix + "_")}


def _number(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else "n/a"


def finetune_card_data(info: FinetuneCardInfo) -> ModelCardData:
    """Card metadata: library, pipeline tag, tags, base model and a model-index with every finite headline metric."""
    eval_results = [
        result
        for split, values in info.metrics.items()
        for result in model_index_results(values, split, info.dataset_type, info.dataset_name, info.label_set.name)
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=list(CARD_TAGS),
        base_model=info.base_model,
        license=info.license,
        datasets=["IDD"] if info.dataset_type == "idd" else None,
        model_name=info.model_name,
        eval_results=eval_results or None,
    )


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def finetune_card_text(info: FinetuneCardInfo) -> str:
    """The Markdown body of the card: data, selection, training set-up, metrics and per-class IoU, usage, limits."""
    label_set = info.label_set
    splits = list(info.metrics)
    lines = [f"# {info.model_name}", ""]
    if info.base_model:
        origin = f"[{info.base_model}](https://huggingface.co/{info.base_model})"
    elif info.packaged_base:
        origin = f"`{info.packaged_base}`, the tiny Mask2Former packaged with roadseg, pretrained on synthetic scenes"
    else:
        origin = "a tiny randomly initialised Mask2Former (the offline demo configuration)"
    lines += [
        f"Mask2Former fine-tuned for semantic segmentation of road scenes with the label set `{label_set.name}` "
        f"({label_set.num_labels} classes), starting from {origin}. Trained with roadseg's `run_finetune.py`.",
        "",
        "## Data",
        "",
        f"- source: `{info.data_source}`" if info.data_source else f"- dataset: {info.dataset_name}",
        "- images per split: " + ", ".join(f"{name} {count}" for name, count in info.split_sizes.items()),
    ]
    if info.split_description:
        lines.append(f"- splits: {info.split_description}")
    lines += ["", "## Labels", "", f"`config.json` maps ids to names (`id2label`, `label2id`); pixels labelled "
              f"{IGNORE_INDEX} are ignored.", ""]
    lines += _markdown_table(
        ["id", "class", "colour"],
        ([class_id, name, "#{:02x}{:02x}{:02x}".format(*label_set.colors[class_id])]
         for class_id, name in sorted(label_set.id2label.items())),
    )
    if info.head_initialisation:
        lines += ["", "The class head started from the base checkpoint's rows of these classes (random: no "
                  "matching class):", ""]
        lines += _markdown_table(["class", "started from"], ((name, origin or "random")
                                                            for name, origin in info.head_initialisation.items()))
    lines += ["", "## Selection", ""]
    if info.selection:
        lines += [f"- {key}: {value}" for key, value in info.selection.items()]
    else:
        lines.append("No selection manifest: trained on every image of the train split.")
    lines += ["", "## Training", ""]
    frozen = ", ".join(f"`{name}`" for name in info.frozen_modules) or "none (full fine-tuning)"
    lines.append(f"- frozen modules (no gradients, kept in eval mode): {frozen}")
    lines += [f"- {key.replace('_', ' ')}: {value:,}" for key, value in info.parameter_counts.items()]
    lines += ["", *_markdown_table(["hyper-parameter", "value"], info.hyperparameters.items())]
    lines += ["", "## Results", ""]
    if splits:
        lines.append("Scored at the size of the original label maps; pixels labelled 255 are ignored.")
        lines.append("")
        summary_rows = [
            [name, *(_number(info.metrics[split].get(key)) for split in splits)]
            for key, name in CARD_SUMMARY_METRICS
            if any(key in info.metrics[split] for split in splits)
        ]
        lines += _markdown_table(["metric", *splits], summary_rows)
        lines += ["", "Per-class IoU (n/a: the class occurs in neither the references nor the predictions):", ""]
        class_rows = [
            [class_id, name, *(_number(info.metrics[split].get(f"iou_{name}")) for split in splits)]
            for class_id, name in sorted(label_set.id2label.items())
        ]
        lines += _markdown_table(["id", "class", *splits], class_rows)
    else:
        lines.append("Not evaluated.")
    if info.plots:
        lines += ["", *(f"![{Path(plot).stem.replace('_', ' ')}]({plot})" for plot in info.plots)]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'segmenter = pipeline("image-segmentation", model="{info.model_name}")',
        '# one {"label": class name, "mask": PIL image} per class present in the prediction',
        'masks = segmenter("street.jpg", subtask="semantic")',
        "```",
        "",
        "## Intended use",
        "",
        "Research and prototyping of drivable-area and road-scene segmentation on street-level camera images, as "
        "in the India Driving Dataset (IDD): pre-labelling, dataset analysis, and a starting point for further "
        "fine-tuning.",
        "",
        "## Limitations",
        "",
        "Not validated for safety-critical use such as driving decisions. Accuracy depends on how close the input "
        "is to the training data (camera, resolution, country, weather, lighting); rare classes score lower than "
        "frequent ones, so check the per-class table. The scores above come from the splits named under Data, not "
        "from the official IDD benchmark server.",
        "",
        "## License",
        "",
        "The weights inherit the terms of the base checkpoint"
        + (f" ([{info.base_model}](https://huggingface.co/{info.base_model}))" if info.base_model else "")
        + " and of the training data. IDD is distributed for non-commercial research under its own terms of use "
        "(https://idd.insaan.iiit.ac.in/); check both before any other use.",
        "",
    ]
    return "\n".join(lines)


def build_finetune_card(info: FinetuneCardInfo) -> ModelCard:
    """The complete model card (YAML metadata with model-index, then the Markdown body)."""
    return ModelCard(f"---\n{finetune_card_data(info).to_yaml()}\n---\n\n{finetune_card_text(info)}")


def write_finetune_card(output_dir: str | os.PathLike[str], info: FinetuneCardInfo) -> Path:
    """Write the card as ``output_dir/README.md`` (atomically) and return its path."""
    return write_text_atomically(Path(output_dir) / "README.md", str(build_finetune_card(info)))
