#!/usr/bin/env python
"""Fine-tune Mask2Former for semantic segmentation of road scenes, with the backbone and pixel decoder frozen.

Examples:
    python run_finetune.py --model_name_or_path tiny --data_dir data/syn --output_dir runs/ft --max_steps 30
    python run_finetune.py --data_dir /data/idd --selection_manifest runs/sel/manifest.json --output_dir runs/idd
    accelerate launch run_finetune.py --data_dir /data/idd --output_dir runs/idd --bf16
    python run_finetune.py config.json   # one JSON file holding every argument

The defaults reproduce the seed baseline: facebook/mask2former-swin-small-cityscapes-semantic, 2 epochs, batch 8
per device, Adam (AdamW with weight decay 0) at a constant learning rate of 5e-5, splits of 85.5 / 4.5 / 10 %.
A rerun with the same --output_dir resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets
import numpy as np
import torch
import transformers
from huggingface_hub.errors import HfHubHTTPError
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint
from transformers.utils import logging as hf_logging

# Importing roadseg_utils sets NO_ALBUMENTATIONS_UPDATE=1 before albumentations loads (else it asks PyPI for updates).
from roadseg_utils.atomic import write_text_atomically
from roadseg_utils.card import FinetuneCardInfo, strip_prefix, training_hyperparameters, write_finetune_card
from roadseg_utils.cli import one_line, parse_size
from roadseg_utils.data import (
    SPLITS,
    DataError,
    DataSourceArguments,
    dataset_column,
    load_segmentation_dataset,
    paths_fingerprint,
    with_sample_transform,
)
from roadseg_utils.evaluation import json_safe
from roadseg_utils.freezing import FROZEN_PARTS
from roadseg_utils.hub import HubPublishError, require_hub
from roadseg_utils.labels import LabelSet, get_label_set
from roadseg_utils.modeling import DEFAULT_CHECKPOINT, TINY_MODEL, ModelLoadError, load_image_processor, load_model
from roadseg_utils.selection import select_training_rows
from roadseg_utils.trainer import (
    EpochSeededDataset,
    FrozenBackboneTrainer,
    final_evaluation_from_training,
    peak_memory_metrics,
)
from roadseg_utils.transforms import build_eval_transforms, build_train_transforms, make_transform_fn
from roadseg_utils.visualize import save_score_charts

logger = hf_logging.get_logger(__name__)

RESULTS_FILE = "all_results.json"
SPLITS_FILE = "data_splits.json"


@dataclass
class ModelArguments:
    """Which checkpoint to start from and which parts of it to train."""

    model_name_or_path: str = field(
        default=DEFAULT_CHECKPOINT,
        metadata={"help": f"Hub id, local model folder, or '{TINY_MODEL}' (a ~1.5M-parameter model built offline)."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models (default: the cached login). Never logged or written."},
    )
    unfreeze_backbone: bool = field(default=False, metadata={"help": "Also train the Swin backbone."})
    unfreeze_pixel_decoder: bool = field(default=False, metadata={"help": "Also train the pixel decoder."})

    @property
    def frozen_parts(self) -> tuple[str, ...]:
        """The parts of `roadseg_utils.freezing.FROZEN_PARTS` that stay frozen."""
        unfrozen = {"backbone": self.unfreeze_backbone, "pixel_decoder": self.unfreeze_pixel_decoder}
        return tuple(part for part in FROZEN_PARTS if not unfrozen[part])


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """The data (any layout of the data layer), the optional selection, and the train and eval geometry."""

    selection_manifest: str | None = field(
        default=None,
        metadata={"help": "manifest.json or manifest.csv of run_selection.py: train only on its selected rows "
                  "(validation and test stay as split)."},
    )
    crop_size: str = field(default="512x1024", metadata={"help": "Training crop as HEIGHTxWIDTH."})
    min_scale: float = field(default=0.5, metadata={"help": "Smallest scale-jitter factor (1 = image just covers "
                                                            "the crop)."})
    max_scale: float = field(default=2.0, metadata={"help": "Largest scale-jitter factor."})
    eval_shortest_edge: int | None = field(
        default=None,
        metadata={"help": "Shortest edge of images fed to the model in evaluation and by the saved image processor "
                  "(default: the crop height; 0: the original size). Scores are always taken at the original size."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.crop = parse_size(self.crop_size)
        except ValueError as err:
            raise ValueError(f"--crop_size: {err}") from err
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale} and {self.max_scale}")
        if self.eval_shortest_edge is not None and self.eval_shortest_edge < 0:
            raise ValueError(f"eval_shortest_edge must be >= 0, got {self.eval_shortest_edge}")

    @property
    def eval_edge(self) -> int | None:
        """The shortest edge for evaluation, or None for the original size."""
        if self.eval_shortest_edge is None:
            return self.crop[0]
        return self.eval_shortest_edge or None


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the seed baseline and six-key batches as defaults."""

    do_train: bool = field(default=True, metadata={"help": "Train (default True)."})
    do_eval: bool = field(default=True, metadata={"help": "Score the validation split after training (default True)."})
    do_predict: bool = field(default=True, metadata={"help": "Score the test split at the end (default True)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Training epochs (the seed baseline: 2)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate (the seed baseline: 5e-5)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0: plain Adam)."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (AdamW; with weight decay 0 it is Adam)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (seed: constant)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate during training."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept in output_dir."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    metric_for_best_model: str | None = field(default="mean_iou", metadata={"help": "Metric that ranks checkpoints."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Data-loader worker processes."})
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available, metadata={"help": "Pin batches in memory (default: on a GPU)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (six-key batches)."})
    batch_eval_metrics: bool = field(default=True, metadata={"help": "Score evaluation batch by batch."})
    eval_do_concat_batches: bool = field(default=False, metadata={"help": "Never concatenate evaluation outputs."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["mask_labels", "class_labels"], metadata={"help": "Label keys of a batch."}
    )

    def __getstate__(self) -> dict[str, Any]:
        # The Trainer pickles these arguments into training_args.bin (output folder, checkpoints, Hub): never a token.
        return {key: None if key.endswith("_token") else value for key, value in self.__dict__.items()}


class CommandLineError(Exception):
    """Bad arguments, data or checkpoint: reported as one line, and the script exits with status 1."""


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, FinetuneTrainingArguments]:
    """Parse the command line, or a single ``.json`` file holding every argument."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FinetuneTrainingArguments))
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, OSError) as err:
        raise CommandLineError(one_line(err)) from err


def setup_logging(training_args: TrainingArguments) -> None:
    """HF-example logging: INFO on the main process, the script's and roadseg_utils' loggers included."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for name in (__name__, "roadseg_utils"):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def fail(message: str) -> NoReturn:
    """Print one error line and exit with status 1."""
    print(f"run_finetune.py: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def save_split_plots(
    output_dir: Path, split: str, scores: Mapping[str, Any], confusion: np.ndarray, label_set: LabelSet
) -> list[str]:
    """The confusion matrix and per-class IoU chart of one split under ``output_dir/plots``; their relative paths."""
    written = [f"plots/confusion_matrix_{split}.png", f"plots/per_class_iou_{split}.png"]
    save_score_charts(confusion, scores, label_set, f"{output_dir.name}: {split}", *(output_dir / p for p in written))
    return written


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and save as the arguments say; returns what all_results.json holds."""
    try:
        model_args, data_args, training_args = parse_arguments(argv)
    except CommandLineError as err:
        fail(str(err))
    setup_logging(training_args)
    logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)

    if training_args.resume_from_checkpoint and not os.path.isdir(training_args.resume_from_checkpoint):
        fail(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no such checkpoint folder")
    last_checkpoint = None
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"resuming from {last_checkpoint} (use another --output_dir to start from scratch)")
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint

    try:
        if training_args.push_to_hub:
            require_hub("--push_to_hub")
        label_set = get_label_set(data_args.label_set)
        model = load_model(
            model_args.model_name_or_path, label_set, model_args.model_revision, model_args.token, model_args.cache_dir
        )
        processor_overrides = {} if data_args.eval_edge else {"do_resize": False}
        image_processor = load_image_processor(
            model_args.model_name_or_path, shortest_edge=data_args.eval_edge, **processor_overrides
        )
        splits = load_segmentation_dataset(data_args, label_set, seed=training_args.seed)
        train_rows, selection = splits["train"], None
        if data_args.selection_manifest:
            train_rows, selection = select_training_rows(
                train_rows, [splits["validation"], splits["test"]], data_args.selection_manifest, label_set
            )
    except (ModelLoadError, HubPublishError, DataError, ValueError, OSError) as err:
        fail(one_line(err))
    if training_args.do_train and len(train_rows) == 0:
        fail(f"{data_args.describe_source()}: the train split is empty")
    if len(splits["validation"]) == 0 and (training_args.do_eval or training_args.eval_strategy != "no"):
        logger.warning("the validation split is empty: no evaluation during or after training")
        training_args.do_eval = False
        training_args.eval_strategy = IntervalStrategy.NO

    mean, std = image_processor.image_mean, image_processor.image_std
    train_transform = build_train_transforms(
        data_args.crop, mean, std, scale_range=(data_args.min_scale, data_args.max_scale)
    )
    eval_transform = make_transform_fn(build_eval_transforms(data_args.eval_edge, mean, std), keep_originals=True)
    train_dataset = EpochSeededDataset(
        with_sample_transform(train_rows, make_transform_fn(train_transform, keep_originals=False)), training_args.seed
    )
    eval_dataset = with_sample_transform(splits["validation"], eval_transform)
    test_dataset = with_sample_transform(splits["test"], eval_transform)

    try:
        trainer = FrozenBackboneTrainer(
            model=model,
            args=training_args,
            frozen_parts=model_args.frozen_parts,
            label_set=label_set,
            train_dataset=train_dataset if training_args.do_train else None,
            eval_dataset=eval_dataset if training_args.do_eval else None,
            processing_class=image_processor,
            callbacks=callbacks,
        )
    except (HfHubHTTPError, OSError, ValueError) as err:
        fail(f"cannot set up training: {one_line(err)}")

    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        # _internal_call: with --push_to_hub, save_model would push a "Model save" commit without metrics or card.
        trainer.save_model(_internal_call=True)
        train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        train_metrics.update({f"train_{key}": value for key, value in peak_memory_metrics().items()})
        trainer.log_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
    evaluated, confusions = {}, {}
    if training_args.do_eval:
        metrics = final_evaluation_from_training(trainer) or trainer.evaluate(
            eval_dataset=eval_dataset, metric_key_prefix="eval"
        )
        trainer.log_metrics("eval", metrics)
        results.update(metrics)
        evaluated["validation"] = strip_prefix(metrics, "eval")
        confusions["validation"] = (trainer.compute_metrics.last_results, trainer.compute_metrics.last_confusion)
    if training_args.do_predict and len(test_dataset):
        metrics = trainer.evaluate(eval_dataset=test_dataset, metric_key_prefix="test")
        trainer.log_metrics("test", metrics)
        results.update(metrics)
        evaluated["test"] = strip_prefix(metrics, "test")
        confusions["test"] = (trainer.compute_metrics.last_results, trainer.compute_metrics.last_confusion)
    results.update(peak_memory_metrics())

    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        write_text_atomically(output_dir / RESULTS_FILE, json.dumps(json_safe(results), indent=2) + "\n")
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
        is_hub_model = model_args.model_name_or_path != TINY_MODEL and not os.path.exists(
            model_args.model_name_or_path
        )
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
                "eval_shortest_edge": data_args.eval_edge or "original size",
                "world_size": training_args.world_size,
            },
            frozen_modules=[FROZEN_PARTS[part] for part in model_args.frozen_parts],
            parameter_counts=trainer.parameter_counts,
            metrics=evaluated,
            plots=plots,
        )
        trainer.card_writer = lambda folder: write_finetune_card(folder, card)
        write_finetune_card(output_dir, card)

    if training_args.push_to_hub:
        try:
            trainer.push_to_hub(commit_message="roadseg run_finetune.py")
        except (HfHubHTTPError, OSError) as err:
            fail(f"push to the Hub failed: {one_line(err)}")
    return results


if __name__ == "__main__":
    main()
