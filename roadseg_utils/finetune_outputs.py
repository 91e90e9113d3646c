"""What a fine-tuning run writes besides the model: the *_results.json files, data_splits.json, plots, the card.

Also the identity a run claims its output folder with (`run_identity`): the data, splits, labels and model its
outputs depend on, so a rerun with other inputs neither resumes from nor mixes with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import TrainingArguments

from .atomic import write_text_atomically
from .card import FinetuneCardInfo, strip_prefix, training_hyperparameters, write_finetune_card
from .data import SPLITS, dataset_column, paths_fingerprint
from .evaluation import json_safe
from .freezing import FROZEN_PARTS
from .labels import LabelSet
from .modeling import PACKAGED_MODELS, TINY_MODEL
from .visualize import save_score_charts

if TYPE_CHECKING:
    from .trainer import FrozenBackboneTrainer

RESULTS_FILE = "all_results.json"
SPLITS_FILE = "data_splits.json"


def run_identity(
    model_args: Any, data_args: Any, label_set: LabelSet, splits: Mapping[str, Any],
    train_rows: Any,
) -> dict[str, Any]:
    """What the outputs of a run depend on: a rerun with other values must not resume or mix with them."""
    source = data_args.describe_source()
    return {
        "data": os.path.abspath(source) if os.path.exists(source) else source,
        "splits": {name: paths_fingerprint(dataset_column(splits[name], "path")) for name in SPLITS},
        "trained_on": paths_fingerprint(dataset_column(train_rows, "path")),
        "label_set": label_set.name,
        "labels": [label_set.id2label[i] for i in range(label_set.num_labels)],
        "model": model_args.model_name_or_path,
    }


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    """One results file, laid out as `Trainer.save_metrics` writes it, atomically."""
    write_text_atomically(path, json.dumps(json_safe(metrics), indent=4, sort_keys=True) + "\n")


def save_split_plots(
    output_dir: Path, split: str, scores: Mapping[str, Any], confusion: np.ndarray, label_set: LabelSet
) -> list[str]:
    """The confusion matrix and per-class IoU chart of one split under ``output_dir/plots``; their relative paths."""
    written = [f"plots/confusion_matrix_{split}.png", f"plots/per_class_iou_{split}.png"]
    save_score_charts(confusion, scores, label_set, f"{output_dir.name}: {split}", *(output_dir / p for p in written))
    return written


def write_outputs(
    trainer: FrozenBackboneTrainer,
    model_args: Any,
    data_args: Any,
    training_args: TrainingArguments,
    output_dir: Path,
    label_set: LabelSet,
    splits: Mapping[str, Any],
    train_rows: Any,
    selection: Any,
    stage_metrics: Mapping[str, Mapping[str, Any]],
    results: Mapping[str, Any],
    confusions: Mapping[str, Any],
) -> None:
    """The results files, data_splits.json, the plots and the model card (main process).

    As `Trainer.save_metrics` names them: ``train_results.json``, ``eval_results.json`` (validation) and
    ``test_results.json`` with each stage's metrics, and ``all_results.json`` with all of them and the peak memory.
    """
    for stage, metrics in stage_metrics.items():
        write_metrics(output_dir / f"{stage}_results.json", metrics)
    write_metrics(output_dir / RESULTS_FILE, results)
    split_paths = {name: sorted(str(p) for p in dataset_column(splits[name], "path")) for name in SPLITS}
    split_record = {
        "seed": training_args.seed,
        "split_by": data_args.split_by,
        "fractions": data_args.fractions,
        "source": data_args.describe_source(),
        "fingerprints": {name: paths_fingerprint(paths) for name, paths in split_paths.items()},
        "trained_on": len(train_rows),
        "paths": split_paths,
    }
    write_text_atomically(output_dir / SPLITS_FILE, json.dumps(split_record, indent=1) + "\n")
    plots = [
        path
        for split, (scores, confusion) in confusions.items()
        if scores is not None and confusion is not None
        for path in save_split_plots(output_dir, split, scores, confusion, label_set)
    ]
    packaged = model_args.model_name_or_path in PACKAGED_MODELS
    is_hub_model = model_args.model_name_or_path != TINY_MODEL and not os.path.exists(model_args.model_name_or_path) \
        and not packaged
    card = FinetuneCardInfo(
        model_name=training_args.hub_model_id or output_dir.name,
        label_set=label_set,
        base_model=model_args.model_name_or_path if is_hub_model else None,
        data_source=data_args.describe_source(),
        dataset_name=Path(data_args.describe_source()).name or data_args.describe_source(),
        split_sizes={name: len(splits[name]) for name in SPLITS} | {"trained on": len(train_rows)},
        split_description=(
            f"seed {training_args.seed}, by {data_args.split_by}, fractions "
            + " / ".join(f"{value:g}" for value in data_args.fractions.values())
            + f"; paths in {SPLITS_FILE}"
        ),
        selection=selection,
        hyperparameters={
            **training_hyperparameters(training_args),
            "crop_size": data_args.crop_size,
            "scale_range": f"{data_args.min_scale}-{data_args.max_scale}",
            "color_jitter_prob": data_args.color_jitter_prob,
            **{f"loss {name}": value for name, value in model_args.loss_settings.items()},
            "eval_shortest_edge": data_args.eval_edge or "original size",
            "world_size": training_args.world_size,
        },
        frozen_modules=[FROZEN_PARTS[part] for part in model_args.frozen_parts],
        parameter_counts=trainer.parameter_counts,
        metrics={split: strip_prefix(stage_metrics[stage], stage)
                 for split, stage in (("validation", "eval"), ("test", "test")) if stage in stage_metrics},
        plots=plots,
        head_initialisation=getattr(trainer.model.config, "head_initialisation", None),
        packaged_base=model_args.model_name_or_path if packaged else None,
    )
    trainer.card_writer = lambda folder: write_finetune_card(folder, card)
    write_finetune_card(output_dir, card)
