"""`FrozenBackboneTrainer`: a `Trainer` that fine-tunes Mask2Former's decoder on six-key batches.

Freezing. ``frozen_parts`` (by default the backbone and the pixel decoder) are frozen and locked in eval mode with
`roadseg_utils.freezing`; the Trainer's optimizer only takes parameters that require gradients.

DDP. With the backbone frozen every trainable parameter receives a gradient on every step, even on a batch whose
crops hold no labelled pixel (tests/test_trainer.py checks it), so ``find_unused_parameters`` is False and DDP skips
its graph walk. A trainable Swin backbone has one unused module, ``swin.layernorm`` (Mask2Former reads the per-stage
``hidden_states_norms`` instead), so then the search is switched on. An explicit ``--ddp_find_unused_parameters``
wins.

Evaluation. ``prediction_step`` turns each batch into label maps at the size of ``original_segmentation_maps`` with
`roadseg_utils.inference` (the same path as run_eval.py's) and returns, instead of logits, one
``num_labels x num_labels`` confusion matrix per image. The Trainer's evaluation loop gathers these with
``accelerator.gather_for_metrics``, which drops the samples that were repeated to even out the last batch across
processes, so `ConfusionMatrixMetrics` sums every image exactly once, on every rank, and nothing of size H x W is
kept beyond one batch. ``eval_num_images`` in the metrics says how many images were counted.

Dropped samples. An evaluation batch may hold placeholders for bad samples skipped in DataLoader workers
(`roadseg_utils.collator`: None in ``original_segmentation_maps``). ``prediction_step`` forwards only the real
images (all of a batch's placeholders when it holds nothing else, so every process still returns a loss), returns a
zero matrix for each placeholder and -1 as its labelled-pixel count, and `ConfusionMatrixMetrics` counts only
images with a count of at least 0, so a skipped sample changes neither the metrics nor ``eval_num_images``.

Checkpoints. `roadseg_utils.checkpoints.CheckpointSafety` (a base of `FrozenBackboneTrainer`) moves every saved
file in whole, turns a failed save into one line, loads checkpoints with the backbone's names mapped, and stops a
finished run from training one step more on resume.

Loss under DDP. `MeanMaskCount` corrects upstream's normalisation of the mask and dice losses by the number of
target masks, which is off by the number of processes (see its docstring).

Augmentation seeds. `EpochSeededDataset` seeds the random augmentation of each example from (seed, epoch, index), so
a run resumed from a checkpoint (which skips the batches already seen without loading them) draws the same crops
and flips as an uninterrupted run, with any number of data-loader workers.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .checkpoints import CheckpointSafety
from .collator import MODEL_INPUT_KEYS, SegmentationCollator
from .confusion import StreamingConfusionMatrix
from .freezing import DEFAULT_FROZEN_PARTS, FROZEN_PARTS, freeze, frozen_modules, lock_eval_mode
from .inference import semantic_maps_from_outputs, valid_sizes_of
from .labels import IGNORE_INDEX, LabelSet
from .metrics import scalar_metrics

logger = logging.get_logger(__name__)


class MeanMaskCount:
    """Replacement for ``Mask2FormerLoss.get_num_masks``: target masks per process, averaged over processes.

    The mask and dice losses are sums over matched masks divided by this count. transformers 5.24 averages the count
    over processes (accelerate's ``reduce`` defaults to the mean) and then divides it by the number of processes
    again, so under N processes those two losses weigh N times more than with one, against the class loss. The
    reference implementation sums over processes and divides once; that is what this does. With one process the
    result is the upstream one.
    """

    def __call__(self, class_labels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The mean number of target masks per process, at least 1."""
        num_masks = torch.as_tensor(float(sum(len(classes) for classes in class_labels)), device=device)
        state = PartialState()
        if state.num_processes > 1:
            num_masks = reduce(num_masks, reduction="sum") / state.num_processes
        return torch.clamp(num_masks, min=1)


def fix_mask_count(model: nn.Module) -> None:
    """Install `MeanMaskCount` on the model's Mask2Former loss (a no-op for models without one)."""
    criterion = getattr(model, "criterion", None)
    if criterion is not None and hasattr(criterion, "get_num_masks"):
        criterion.get_num_masks = MeanMaskCount()


class EpochSeededDataset(torch.utils.data.Dataset):
    """A map-style dataset whose random transform is seeded per example from (seed, epoch, index).

    The transforms of `roadseg_utils.transforms` draw their per-example seed from NumPy's global generator; this
    wrapper sets that generator for the duration of one ``__getitem__`` and restores it afterwards, so the global
    stream of the process is left alone. `EpochSeedCallback` (added by `FrozenBackboneTrainer`) sets the epoch.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation stream of ``epoch``."""
        self.epoch = int(epoch)

    def example_seed(self, index: int) -> int:
        """The 32-bit seed of example ``index`` in the current epoch."""
        return int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])

    def __getitem__(self, index: int) -> Any:
        saved = np.random.get_state()
        np.random.seed(self.example_seed(index))
        try:
            return self.dataset[int(index)]
        finally:
            np.random.set_state(saved)


class EpochSeedCallback(TrainerCallback):
    """Tell an `EpochSeededDataset` which epoch starts (before the data loader's workers are started)."""

    def __init__(self, dataset: EpochSeededDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Set the epoch from the trainer state (a resumed run restores it from the checkpoint)."""
        self.dataset.set_epoch(int(state.epoch or 0))


def per_image_confusion(
    predictions: Sequence[torch.Tensor], references: Sequence[Any], num_labels: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """One int64 (num_labels, num_labels) confusion matrix (true x predicted) per image, on the predictions' device."""
    matrices = []
    for prediction, reference in zip(predictions, references, strict=True):
        counts = StreamingConfusionMatrix(num_labels, ignore_index, device=prediction.device)
        counts.update([prediction], [reference])
        matrices.append(counts.matrix_tensor)
    return torch.stack(matrices)


class ConfusionMatrixMetrics:
    """``compute_metrics`` for `FrozenBackboneTrainer`: sums the per-image confusion matrices of the predictions.

    Works with ``batch_eval_metrics=True`` (called once per gathered batch, metrics on the last call) and without it
    (called once with all matrices). The result holds the scalar metrics of `compute_segmentation_metrics`
    (``mean_iou``, ``iou_<class>`` ...) and ``num_images``, the images whose label id (their labelled-pixel count)
    is at least 0, so dropped samples' placeholders (-1) are not counted; ``last_results`` keeps the full last
    result, arrays included, and ``last_confusion`` the summed matrix.
    """

    def __init__(
        self,
        num_labels: int,
        id2label: Mapping[int, str] | None = None,
        coarser: Mapping[str, Mapping[int, int]] | None = None,
    ) -> None:
        self.confusion = StreamingConfusionMatrix(num_labels, None)
        self.id2label = id2label
        self.coarser = coarser
        self.num_images = 0
        self.last_results: dict[str, Any] | None = None
        self.last_confusion: np.ndarray | None = None

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        """Add this batch's matrices; when ``compute_result``, return the metrics of everything added and reset."""
        matrices = _as_tensor(eval_pred.predictions)
        if matrices.ndim != 3:
            raise ValueError(f"expected per-image confusion matrices (B, C, C), got shape {tuple(matrices.shape)}")
        self.confusion.add_matrix(matrices.sum(dim=0))
        counts = eval_pred.label_ids
        self.num_images += matrices.shape[0] if counts is None else int((_as_tensor(counts) >= 0).sum())
        if not compute_result:
            return {}
        self.last_confusion = self.confusion.matrix
        self.last_results = self.confusion.compute(self.id2label, self.coarser)
        results = scalar_metrics(self.last_results)
        results["num_images"] = self.num_images
        self.confusion.reset()
        self.num_images = 0
        return results


def _as_tensor(values: Any) -> torch.Tensor:
    """One tensor from a tensor, an array, or a list of per-batch ones (concatenated)."""
    if isinstance(values, (list, tuple)):
        return torch.cat([torch.as_tensor(np.asarray(torch.as_tensor(v).cpu())) for v in values])
    return torch.as_tensor(values)


def _select_examples(inputs: Mapping[str, Any], kept: list[int]) -> dict[str, Any]:
    """The batch restricted to the examples at positions ``kept``."""
    selected = dict(inputs)
    for key in ("pixel_values", "pixel_mask"):
        selected[key] = inputs[key][kept]
    for key in ("mask_labels", "class_labels", "original_images", "original_segmentation_maps"):
        if inputs.get(key):
            selected[key] = [inputs[key][i] for i in kept]
    return selected


def peak_memory_metrics() -> dict[str, float]:
    """Peak resident memory of this process in MiB, and the peak CUDA allocation when CUDA was used."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    metrics = {"peak_cpu_rss_mb": peak_rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return metrics


class FrozenBackboneTrainer(CheckpointSafety, Trainer):
    """A `Trainer` for Mask2Former that freezes ``frozen_parts`` and scores evaluation batch by batch.

    ``frozen_parts`` is a subset of ``("backbone", "pixel_decoder")``; ``()`` fine-tunes everything. The data collator
    defaults to `SegmentationCollator`, ``compute_metrics`` to `ConfusionMatrixMetrics` over the model's ``id2label``
    (plus ``label_set.coarser`` levels). A ``train_dataset`` wrapped in `EpochSeededDataset` gets its epoch set.
    ``args`` is adjusted in place: ``remove_unused_columns`` must be False for six-key batches, and
    ``ddp_find_unused_parameters`` is chosen as the module docstring explains when it is None.
    """

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        frozen_parts: Sequence[str] = DEFAULT_FROZEN_PARTS,
        label_set: LabelSet | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(frozen_parts) - set(FROZEN_PARTS))
        if unknown:
            raise ValueError(f"unknown frozen parts {unknown}; choose from {sorted(FROZEN_PARTS)}")
        self.frozen_parts = tuple(part for part in FROZEN_PARTS if part in frozen_parts)
        fix_mask_count(model)
        self.parameter_counts = freeze(model, self.frozen_parts)
        lock_eval_mode(frozen_modules(model, self.frozen_parts))
        logger.info(
            "frozen %s: %s trainable and %s frozen parameters",
            ", ".join(FROZEN_PARTS[part] for part in self.frozen_parts) or "nothing",
            f"{self.parameter_counts['trainable_parameters']:,}",
            f"{self.parameter_counts['frozen_parameters']:,}",
        )
        if args.remove_unused_columns:
            logger.info("remove_unused_columns set to False: the collator needs the label and original columns")
            args.remove_unused_columns = False
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = "backbone" not in self.frozen_parts
        train_dataset = kwargs.get("train_dataset")
        if isinstance(train_dataset, EpochSeededDataset) and args.dataloader_persistent_workers:
            raise ValueError(
                "dataloader_persistent_workers keeps the workers' copy of the training set at epoch 0, so every epoch "
                "would repeat the first epoch's augmentations; leave it off"
            )
        self.num_labels = int(model.config.num_labels)
        self.ignore_index = IGNORE_INDEX
        kwargs.setdefault("data_collator", SegmentationCollator(num_labels=self.num_labels))
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = ConfusionMatrixMetrics(
                self.num_labels,
                id2label={int(k): v for k, v in model.config.id2label.items()},
                coarser=label_set.coarser if label_set is not None else None,
            )
        super().__init__(model=model, args=args, **kwargs)
        self.card_writer: Callable[[str], Any] | None = None
        if isinstance(train_dataset, EpochSeededDataset):
            self.add_callback(EpochSeedCallback(train_dataset))

    def model_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The four keys ``forward`` takes, images and masks cast to the model's floating dtype."""
        dtype = self.accelerator.unwrap_model(model).dtype
        selected = {key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs}
        selected["pixel_values"] = selected["pixel_values"].to(dtype)
        if "mask_labels" in selected:
            selected["mask_labels"] = [masks.to(dtype) for masks in selected["mask_labels"]]
        return selected

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Mask2Former's own loss (a batch mean) on the four model keys."""
        outputs = model(**self.model_inputs(model, inputs))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Loss, per-image confusion matrices at the original label size, and per-image labelled-pixel counts.

        A placeholder of a dropped sample gets a zero matrix and a count of -1 (module docstring).
        """
        inputs = self._prepare_inputs(inputs)
        num_images = inputs["pixel_values"].shape[0]
        references = inputs.get("original_segmentation_maps") or []
        kept = [i for i, reference in enumerate(references) if reference is not None]
        if 0 < len(kept) < num_images:
            inputs = _select_examples(inputs, kept)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**self.model_inputs(model, inputs))
        loss = outputs.loss.detach() if outputs.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        if len(references) != num_images:
            raise ValueError(
                "evaluation batches need original_segmentation_maps for every image: build the eval transform with "
                "keep_originals=True"
            )
        device = outputs.class_queries_logits.device
        confusion = torch.zeros((num_images, self.num_labels, self.num_labels), dtype=torch.int64, device=device)
        labelled = torch.full((num_images,), -1, dtype=torch.int64, device=device)
        if kept:
            maps = semantic_maps_from_outputs(
                outputs.class_queries_logits.float(),
                outputs.masks_queries_logits.float(),
                target_sizes=[tuple(np.shape(references[i])[:2]) for i in kept],
                valid_sizes=valid_sizes_of(inputs["pixel_mask"]),
                input_size=tuple(inputs["pixel_values"].shape[-2:]),
            )
            matrices = per_image_confusion(maps, [references[i] for i in kept], self.num_labels, self.ignore_index)
            confusion[kept] = matrices
            labelled[kept] = matrices.sum(dim=(1, 2))
        return loss, confusion, labelled

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Keep the card written by ``card_writer`` (set by the script) instead of the Trainer's generic one."""
        if self.card_writer is None:
            super().create_model_card(*args, **kwargs)
        elif self.is_world_process_zero():
            self.card_writer(self.args.output_dir)


def final_evaluation_from_training(trainer: Trainer) -> dict[str, Any] | None:
    """The validation metrics logged during training at its last step, if they describe the final weights."""
    if trainer.args.load_best_model_at_end:
        return None
    for entry in reversed(trainer.state.log_history):
        if "eval_mean_iou" in entry:
            if entry.get("step") != trainer.state.global_step:
                return None
            logger.info(f"validation metrics of step {entry['step']} were logged during training; not evaluating again")
            return {key: value for key, value in entry.items() if key.startswith("eval_") or key == "epoch"}
    return None
