#!/usr/bin/env python
"""Fine-tune Mask2Former for semantic segmentation of road scenes, with the backbone and pixel decoder frozen.

Examples:
    python run_finetune.py --model_name_or_path tiny --data_dir data/syn --output_dir runs/ft --max_steps 30
    python run_finetune.py --data_dir /data/idd --selection_manifest runs/sel/manifest.json --output_dir runs/idd
    accelerate launch run_finetune.py --data_dir /data/idd --output_dir runs/idd --bf16
    python run_finetune.py config.json   # one JSON file holding every argument

The defaults reproduce the seed baseline: facebook/mask2former-swin-small-cityscapes-semantic, 2 epochs, batch 8
per device, Adam (AdamW with weight decay 0) at a constant learning rate of 5e-5, splits of 85.5 / 4.5 / 10 %.
A rerun with the same --output_dir resumes from its newest complete checkpoint.

Before any expensive step the script checks its arguments, that --output_dir can be written, that no other run
writes into it (a lock held for the whole run), and, once the data is loaded, that the folder holds no outputs of a
run with other data, labels or model. ``RUN_INCOMPLETE`` marks the folder from then until the last output is
written. Every refusal is one line ``run_finetune.py: error: ...`` and exit status 1.
"""

from __future__ import annotations

from roadseg_utils.versions import check_versions

# First: with too old a torch, transformers or accelerate the imports below may fail, or training may fail later.
check_versions("run_finetune.py")

import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets
import torch
import transformers
from huggingface_hub.errors import HfHubHTTPError
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import get_available_reporting_integrations
from transformers.trainer_utils import IntervalStrategy
from transformers.utils import logging as hf_logging

# Importing roadseg_utils sets NO_ALBUMENTATIONS_UPDATE=1 before albumentations loads (else it asks PyPI for updates).
from roadseg_utils.checkpoints import checkpoint_folders, checkpoint_to_resume, remove_stale_staging
from roadseg_utils.cli import CommandLineError, OneLineParser, one_line, parse_script_arguments, parse_size
from roadseg_utils.cli import fail as fail_with
from roadseg_utils.data import (
    SPLITS,
    BadSampleGuard,
    DataError,
    DataSourceArguments,
    load_segmentation_dataset,
    source_label_set,
    subsample,
    with_sample_transform,
)
from roadseg_utils.finetune_outputs import run_identity, write_outputs
from roadseg_utils.freezing import FROZEN_PARTS
from roadseg_utils.hub import HubPublishError, require_hub
from roadseg_utils.modeling import (
    DEFAULT_CHECKPOINT,
    TINY_MODEL,
    ModelLoadError,
    load_image_processor,
    load_model,
    parse_loss_overrides,
)
from roadseg_utils.output_dir import (
    IncompleteMarker,
    OutputDirError,
    OutputLock,
    claim_output_dir,
    earlier_outputs,
    prepare_output_dir,
)
from roadseg_utils.parallel import default_loader_workers, limit_loader_threads
from roadseg_utils.selection import select_training_rows
from roadseg_utils.trainer import (
    EpochSeededDataset,
    FrozenBackboneTrainer,
    final_evaluation_from_training,
    peak_memory_metrics,
)
from roadseg_utils.transforms import build_train_transforms, make_eval_transform, make_transform_fn

logger = hf_logging.get_logger(__name__)

SCRIPT = "run_finetune.py"


@dataclass
class ModelArguments:
    """Which checkpoint to start from and which parts of it to train."""

    model_name_or_path: str = field(
        default=DEFAULT_CHECKPOINT,
        metadata={"help": f"Hub id, local model folder, '{TINY_MODEL}' (a ~1.5M-parameter model built offline) or "
                  "'tiny-cityscapes' (the same model pretrained on synthetic Cityscapes-like scenes, packaged)."},
    )
    label_mapping: str | None = field(
        default=None,
        metadata={"help": "JSON file {\"target class\": \"checkpoint class\" or null}: which checkpoint class-head row "
                  "each new class starts from (default: same name, then the built-in Cityscapes->IDD map)."},
    )
    loss_overrides: str | None = field(
        default=None,
        metadata={"help": "Loss settings replacing the checkpoint's, as NAME=VALUE,...: class_weight, mask_weight, "
                  "dice_weight, no_object_weight, train_num_points, oversample_ratio, importance_sample_ratio."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models (default: the cached login). Never logged or written."},
    )
    unfreeze_backbone: bool = field(default=False, metadata={"help": "Also train the Swin backbone."})
    unfreeze_pixel_decoder: bool = field(default=False, metadata={"help": "Also train the pixel decoder."})

    def __post_init__(self) -> None:
        self.loss_settings = parse_loss_overrides(self.loss_overrides)

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
    color_jitter_prob: float = field(
        default=0.8,
        metadata={"help": "Share of training images given colour jitter (brightness, contrast and saturation 0.25, "
                  "hue 0.05); 0 turns it off."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on at most this many images of the train split (a seeded subset, taken after "
                  "--selection_manifest), for quick runs or debugging."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on at most this many images of the validation split (a seeded subset)."},
    )
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
        if not (0 < self.min_scale <= self.max_scale and math.isfinite(self.max_scale)):
            raise ValueError(f"--min_scale and --max_scale need 0 < min_scale <= max_scale < inf, got {self.min_scale} "
                             f"and {self.max_scale}")
        if not 0 <= self.color_jitter_prob <= 1:
            raise ValueError(f"--color_jitter_prob must lie in [0, 1], got {self.color_jitter_prob}")
        if self.selection_manifest is not None and not os.path.isfile(self.selection_manifest):
            raise ValueError(f"--selection_manifest {self.selection_manifest}: no such file")
        for option in ("max_train_samples", "max_eval_samples"):
            if getattr(self, option) is not None and getattr(self, option) < 1:
                raise ValueError(f"--{option} must be at least 1, got {getattr(self, option)}")
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
    dataloader_num_workers: int = field(
        default_factory=default_loader_workers,
        metadata={"help": "Data-loader worker processes (default: the usable cores shared by this node's processes, "
                  "at most 8)."},
    )
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available, metadata={"help": "Pin batches in memory (default: on a GPU)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (six-key batches)."})
    batch_eval_metrics: bool = field(default=True, metadata={"help": "Score evaluation batch by batch."})
    eval_do_concat_batches: bool = field(default=False, metadata={"help": "Never concatenate evaluation outputs."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["mask_labels", "class_labels"], metadata={"help": "Label keys of a batch."}
    )
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "Loggers to send metrics to (tensorboard, wandb, ...); none by default on every transformers "
                  "version, so a preinstalled wandb does not start logging unasked."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the outputs of another run in --output_dir and start over (its checkpoints are "
                  "deleted) instead of refusing a folder of other inputs or resuming in it."},
    )

    def __post_init__(self) -> None:
        problem = training_argument_problem(self)
        if problem is not None:
            raise ValueError(problem)
        super().__post_init__()

    def __getstate__(self) -> dict[str, Any]:
        # The Trainer pickles these arguments into training_args.bin (output folder, checkpoints, Hub): never a token.
        return {key: None if key.endswith("_token") else value for key, value in self.__dict__.items()}


def _at_least_one(value: float) -> bool:
    return value >= 1


def _finite_non_negative(value: float) -> bool:
    return 0 <= value < math.inf


TRAINING_ARGUMENT_RULES = [
    ("per_device_train_batch_size", _at_least_one, "at least 1"),
    ("per_device_eval_batch_size", _at_least_one, "at least 1"),
    ("gradient_accumulation_steps", _at_least_one, "at least 1"),
    ("learning_rate", _finite_non_negative, "a finite number >= 0"),
    ("weight_decay", _finite_non_negative, "a finite number >= 0"),
    ("num_train_epochs", _finite_non_negative, "a finite number >= 0"),
    ("max_grad_norm", math.isfinite, "a finite number"),
    ("adam_beta1", lambda value: 0 <= value < 1, "in [0, 1)"),
    ("adam_beta2", lambda value: 0 <= value < 1, "in [0, 1)"),
    ("adam_epsilon", lambda value: 0 < value < math.inf, "a finite number > 0"),
    ("max_steps", lambda value: value != 0, "positive, or -1 to train for --num_train_epochs"),
    ("dataloader_num_workers", lambda value: value >= 0, ">= 0"),
    ("seed", lambda value: 0 <= value < 2**32, "in 0..2**32-1"),
]


def training_argument_problem(args: TrainingArguments) -> str | None:
    """The first training argument that cannot work, as one line naming the option, or None."""
    for name, ok, requirement in TRAINING_ARGUMENT_RULES:
        if not ok(getattr(args, name)):
            return f"--{name} must be {requirement}, got {getattr(args, name)}"
    for name in ("save", "eval", "logging"):
        strategy, steps = getattr(args, f"{name}_strategy"), getattr(args, f"{name}_steps")
        if str(getattr(strategy, "value", strategy)) == "steps" and steps is not None and not 0 < steps < math.inf:
            return f"--{name}_steps must be a positive number with --{name}_strategy steps, got {steps}"
    if args.do_train and args.max_steps < 0 and args.num_train_epochs == 0:
        return "--num_train_epochs 0 trains nothing: give a positive number of epochs or --max_steps"
    loggers = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
    missing = [name for name in loggers if name not in ("none", "all", *get_available_reporting_integrations())]
    if missing:
        return f"--report_to {missing[0]}: its package is not installed (pip install {missing[0]})"
    return None


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, FinetuneTrainingArguments]:
    """Parse the command line, or a single ``.json`` file holding every argument."""
    parser = OneLineParser((ModelArguments, DataTrainingArguments, FinetuneTrainingArguments))
    parsed, _ = parse_script_arguments(parser, sys.argv[1:] if argv is None else argv)
    return parsed


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


def process_summary(training_args: TrainingArguments) -> str:
    """The HF examples' per-process line: rank, device, GPUs, whether distributed, 16-bit mode."""
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    return (
        f"Process rank: {training_args.process_index} of {training_args.world_size} (local rank "
        f"{training_args.local_rank}), device: {training_args.device}, n_gpu: {training_args.n_gpu}, distributed "
        f"training: {training_args.parallel_mode.value == 'distributed'}, 16-bit training: {precision}"
    )


def warn_if_reused(output_dir: Path, overwrite: bool) -> None:
    """Say so when training starts from scratch in a folder that already holds files but no checkpoint."""
    earlier = earlier_outputs(output_dir)
    if earlier and not overwrite:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        logger.warning(
            f"--output_dir {output_dir} already holds {shown}, but no checkpoint to resume from: training starts "
            "from step 0 and replaces the files of the same names (another --output_dir keeps them)"
        )


def fail(message: str) -> NoReturn:
    """Print one error line and exit with status 1."""
    fail_with(SCRIPT, message)


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and save as the arguments say; returns what all_results.json holds."""
    try:
        model_args, data_args, training_args = parse_arguments(argv)
    except CommandLineError as err:
        fail(str(err))
    setup_logging(training_args)
    # A warning, so every process prints its own line (the others log warnings and errors only).
    logger.warning(process_summary(training_args))
    logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    with ExitStack() as locked:
        try:
            # Under DDP the main process checks, locks, claims and marks the folder for all processes.
            if training_args.process_index == 0:
                output_dir = prepare_output_dir(output_dir)
                locked.enter_context(OutputLock(output_dir, SCRIPT))
                for stale in remove_stale_staging(output_dir):
                    logger.info(f"deleted {stale}, left by a run that stopped while saving")
            checkpoint = checkpoint_to_resume(training_args)
        except (OutputDirError, CommandLineError) as err:
            fail(str(err))
        if training_args.process_index == 0 and checkpoint is None and training_args.do_train:
            warn_if_reused(output_dir, training_args.overwrite_output_dir)
        trainer, results = finetune(model_args, data_args, training_args, output_dir, checkpoint, callbacks)
        if training_args.push_to_hub:
            try:
                trainer.push_to_hub(commit_message="roadseg run_finetune.py")
            except (HfHubHTTPError, OSError) as err:
                fail(f"push to the Hub failed: {one_line(err)}")
    return results


def finetune(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: FinetuneTrainingArguments,
    output_dir: Path,
    checkpoint: str | None,
    callbacks: list[TrainerCallback] | None,
) -> tuple[FrozenBackboneTrainer, dict[str, Any]]:
    """Load, claim the checked and locked output folder, train, evaluate and save; the trainer and the results."""
    try:
        if training_args.push_to_hub:
            require_hub("--push_to_hub")
        label_set = source_label_set(data_args)
        model = load_model(
            model_args.model_name_or_path, label_set, model_args.model_revision, model_args.token, model_args.cache_dir,
            model_args.label_mapping, model_args.loss_settings,
        )
        processor_overrides = {} if data_args.eval_edge else {"do_resize": False}
        image_processor = load_image_processor(
            model_args.model_name_or_path, shortest_edge=data_args.eval_edge, **processor_overrides
        )
        # Under DDP the main process validates (or reads the label cache) and writes the cache; the others then read it.
        with training_args.main_process_first(desc="validating the data"):
            splits = load_segmentation_dataset(data_args, label_set, seed=training_args.seed)
        train_rows, selection = splits["train"], None
        if data_args.selection_manifest:
            train_rows, selection = select_training_rows(
                train_rows, [splits["validation"], splits["test"]], data_args.selection_manifest, label_set
            )
        seed = training_args.seed
        train_rows = at_most(train_rows, data_args.max_train_samples, seed, "train")
        splits["validation"] = at_most(splits["validation"], data_args.max_eval_samples, seed, "validation")
    except (ModelLoadError, HubPublishError, DataError, ValueError, OSError) as err:
        fail(one_line(err))
    if training_args.do_train and len(train_rows) == 0:
        fail(f"{data_args.describe_source()}: the train split is empty")
    if len(splits["validation"]) == 0 and (training_args.do_eval or training_args.eval_strategy != "no"):
        logger.warning("the validation split is empty: no evaluation during or after training")
        training_args.do_eval = False
        training_args.eval_strategy = IntervalStrategy.NO

    # RUN_INCOMPLETE stays if anything below fails: until the last output is written, the folder's files may be
    # partial or mix two runs.
    with ExitStack() as marked:
        if training_args.process_index == 0:
            identity = run_identity(model_args, data_args, label_set, splits, train_rows)
            try:
                claim_output_dir(output_dir, SCRIPT, identity, overwrite=training_args.overwrite_output_dir)
            except OutputDirError as err:
                fail(str(err))
            marked.enter_context(IncompleteMarker(output_dir, SCRIPT))
            if training_args.overwrite_output_dir:
                for folder in checkpoint_folders(output_dir):
                    logger.info(f"--overwrite_output_dir: deleting {folder} of the earlier run")
                    shutil.rmtree(folder)
        if checkpoint is not None:
            logger.info(f"resuming from {checkpoint} (use another --output_dir to start from scratch)")
        sets = guarded_datasets(data_args, training_args, image_processor, splits, train_rows)
        limit_loader_threads(training_args.dataloader_num_workers)
        try:
            trainer = FrozenBackboneTrainer(
                model=model,
                args=training_args,
                frozen_parts=model_args.frozen_parts,
                label_set=label_set,
                train_dataset=sets["train"] if training_args.do_train else None,
                eval_dataset=sets["validation"] if training_args.do_eval else None,
                processing_class=image_processor,
                callbacks=callbacks,
            )
        except (HfHubHTTPError, OSError, ValueError) as err:
            fail(f"cannot set up training: {one_line(err)}")
        try:
            stage_metrics, confusions = train_and_evaluate(trainer, training_args, sets, checkpoint)
            results = {key: value for metrics in stage_metrics.values() for key, value in metrics.items()}
            results.update(peak_memory_metrics())
            if trainer.is_world_process_zero():
                write_outputs(trainer, model_args, data_args, training_args, output_dir, label_set, splits,
                              train_rows, selection, stage_metrics, results, confusions)
        except DataError as err:
            fail(one_line(err))
        except OSError as err:
            fail(f"{one_line(err)}; rerun the same command to resume from the last complete checkpoint")
        except KeyboardInterrupt:
            fail("interrupted; rerun the same command to resume from the last complete checkpoint")
    return trainer, results


def at_most(rows: Any, max_rows: int | None, seed: int, split: str) -> Any:
    """A seeded subset of ``max_rows`` of a split's ``rows`` (all of them when there are no more), logged."""
    keep = subsample(len(rows), max_rows, seed, SPLITS.index(split))
    if keep is None:
        return rows
    logger.info(f"{split} split: a seeded subset of {len(keep)} of its {len(rows)} images")
    return rows.select(keep)


def guarded_datasets(
    data_args: DataTrainingArguments,
    training_args: FinetuneTrainingArguments,
    image_processor: Any,
    splits: Mapping[str, Any],
    train_rows: Any,
) -> dict[str, Any]:
    """The transformed train, validation and test datasets, each applying --on_bad_sample to rows read later.

    A sample found bad only when a DataLoader worker decodes it gets the start-up policy: training substitutes the
    next good one (inside the epoch seeding, so a resumed run draws the same), evaluation leaves it out.
    """
    mean, std = image_processor.image_mean, image_processor.image_std
    train_transform = build_train_transforms(
        data_args.crop, mean, std, scale_range=(data_args.min_scale, data_args.max_scale),
        color_jitter_prob=data_args.color_jitter_prob,
    )
    eval_transform = make_eval_transform(image_processor)
    policy, source = data_args.on_bad_sample, data_args.describe_source()
    train = with_sample_transform(train_rows, make_transform_fn(train_transform, keep_originals=False))
    guarded = {"train": EpochSeededDataset(BadSampleGuard(train, policy, substitute=True, source=source),
                                           training_args.seed)}
    for name in ("validation", "test"):
        evaluated = with_sample_transform(splits[name], eval_transform)
        guarded[name] = BadSampleGuard(evaluated, policy, substitute=False, source=source)
    return guarded


def train_and_evaluate(
    trainer: FrozenBackboneTrainer,
    training_args: FinetuneTrainingArguments,
    sets: Mapping[str, Any],
    checkpoint: str | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Train (resuming from ``checkpoint``) and score; the metrics per stage (train, eval, test) and the confusions."""
    stage_metrics: dict[str, dict[str, Any]] = {}
    confusions: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        # _internal_call: with --push_to_hub, save_model would push a "Model save" commit without metrics or card.
        trainer.save_model(_internal_call=True)
        train_metrics = {**train_result.metrics, "train_samples": len(sets["train"])}
        train_metrics.update({f"train_{key}": value for key, value in peak_memory_metrics().items()})
        trainer.log_metrics("train", train_metrics)
        trainer.save_state()
        stage_metrics["train"] = train_metrics
    if training_args.do_eval:
        metrics = final_evaluation_from_training(trainer) or trainer.evaluate(
            eval_dataset=sets["validation"], metric_key_prefix="eval"
        )
        trainer.log_metrics("eval", metrics)
        stage_metrics["eval"] = metrics
        confusions["validation"] = (trainer.compute_metrics.last_results, trainer.compute_metrics.last_confusion)
    if training_args.do_predict and len(sets["test"]):
        metrics = trainer.evaluate(eval_dataset=sets["test"], metric_key_prefix="test")
        trainer.log_metrics("test", metrics)
        stage_metrics["test"] = metrics
        confusions["test"] = (trainer.compute_metrics.last_results, trainer.compute_metrics.last_confusion)
    return stage_metrics, confusions


if __name__ == "__main__":
    main()
