"""The sharded scoring loop of run_eval.py: predict each batch, count the confusion, collect overlays and exports.

Under ``accelerate launch`` every process scores its own strided shard (no image twice), padded so that all run
the same number of batches and their per-batch collectives line up; the padding is predicted, never counted. The
confusion matrices are summed across processes. A sample that turns bad when a data-loader worker decodes it
follows ``--on_bad_sample`` through `BadSampleGuard`: ``error`` stops the run, ``skip`` leaves it out and counts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .collator import SegmentationCollator
from .confusion import StreamingConfusionMatrix, all_reduce_confusion
from .data import BadSampleGuard
from .export import write_prediction
from .inference import predict_batch
from .progress import progress_bar
from .protocol import IddProtocolConfusion


def shard_positions(num_items: int, num_processes: int, process_index: int) -> tuple[list[int], int]:
    """This process's item indices (strided) padded to the same length on every process, and how many are real.

    Every process then runs the same number of batches, so per-batch collectives line up; the padding repeats
    a real index and is never counted.
    """
    mine = list(range(process_index, num_items, num_processes))
    length = math.ceil(num_items / num_processes)
    filler = mine[-1] if mine else 0
    return mine + [filler] * (length - len(mine)), len(mine)


class DropSkipped:
    """A collate function that leaves out the samples `BadSampleGuard` skipped (None) and says which it kept.

    Returns ``{"kept": positions in the batch, "batch": the collated batch, or None when every sample was skipped}``.
    """

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        kept = [i for i, example in enumerate(examples) if example is not None]
        return {"kept": kept, "batch": self.collate([examples[i] for i in kept]) if kept else None}


class ShardScores(NamedTuple):
    """What scoring a split across processes found (the matrix and skipped images are the whole split's)."""

    matrix: np.ndarray
    skipped: list[int]
    overlay_predictions: dict[int, np.ndarray]
    protocol_matrix: np.ndarray | None = None  # the IDD official protocol's 27x27 matrix, when asked for


def score_shards(
    model: torch.nn.Module,
    dataset: Any,
    accelerator: Accelerator,
    *,
    num_labels: int,
    on_bad_sample: str,
    source: str,
    batch_size: int,
    num_workers: int,
    tta: str,
    working_size: int | None,
    tta_scales: tuple[float, ...] | None = None,
    tta_tiling: bool = True,
    overlays: set[int],
    export_targets: Mapping[int, tuple[Path, Path]] | None = None,
    export_lookup: np.ndarray | None = None,
    protocol_resolution: int | None = None,
) -> ShardScores:
    """Predict and count this process's shard of a transformed split; the main process writes the exports.

    ``overlays`` are the split indices whose predictions come back for pictures; with ``export_targets`` (per
    index, the prediction's and the ground truth's file) every prediction and the ground truth it was scored against
    are written (through ``export_lookup``) by a small thread pool while the model runs. With
    ``protocol_resolution`` (720, ...) the IDD official protocol's matrix is counted too (`protocol`).
    """
    is_main = accelerator.is_main_process
    positions, num_real = shard_positions(len(dataset), accelerator.num_processes, accelerator.process_index)
    loader = torch.utils.data.DataLoader(
        BadSampleGuard(dataset, on_bad_sample, substitute=False, source=source),
        batch_size=batch_size,
        sampler=positions,
        collate_fn=DropSkipped(SegmentationCollator(with_targets=False)),
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    model.to(accelerator.device).eval()
    confusion = StreamingConfusionMatrix(num_labels, device=accelerator.device)
    # With a protocol resolution, the IDD official protocol's matrix is counted too, from the same maps.
    protocol = IddProtocolConfusion(protocol_resolution) if protocol_resolution else None
    wanted = set(overlays) | (set(range(len(dataset))) if export_targets else set())
    overlay_predictions: dict[int, np.ndarray] = {}
    skipped: list[int] = []
    with ThreadPoolExecutor(max_workers=2) as writer, torch.inference_mode():
        writes = []
        batches = progress_bar(loader, desc="evaluating", unit="batch", enabled=accelerator.is_local_main_process)
        for step, item in enumerate(batches):
            start = step * batch_size
            size = min(batch_size, len(positions) - start)
            batch, kept = item["batch"], item["kept"]
            skipped += [positions[start + i] for i in range(size) if i not in kept and start + i < num_real]
            # Batch slots past num_real are the shard's padding: predicted (to keep processes in step), never counted.
            real = [j for j, slot in enumerate(kept) if start + slot < num_real]
            predictions = []
            if batch is not None:
                predictions = predict_batch(model, batch, accelerator, tta, working_size, tta_scales, tta_tiling)
            if real:
                confusion.update([predictions[j] for j in real],
                                 [batch["original_segmentation_maps"][j] for j in real])
                for j in real if protocol else ():
                    protocol.update(predictions[j], batch["original_segmentation_maps"][j])
            found = [(positions[start + kept[j]], predictions[j].cpu().numpy(),
                      batch["original_segmentation_maps"][j] if export_targets else None) for j in real
                     if positions[start + kept[j]] in wanted]
            if wanted and accelerator.num_processes > 1:
                found = gather_object(found)
            if not is_main:
                continue
            for index, prediction, reference in found:
                if index in overlays:
                    overlay_predictions[index] = prediction
                if export_targets:
                    prediction_file, reference_file = export_targets[index]
                    writes.append(writer.submit(write_prediction, prediction, export_lookup, prediction_file))
                    writes.append(writer.submit(write_prediction, np.asarray(reference), export_lookup, reference_file))
        for write in writes:
            write.result()
    if accelerator.num_processes > 1:
        skipped = gather_object(skipped)
    matrix = all_reduce_confusion(confusion.matrix_tensor, accelerator).cpu().numpy()
    protocol_matrix = all_reduce_confusion(protocol.matrix, accelerator) if protocol else None
    return ShardScores(matrix, sorted(skipped), overlay_predictions, protocol_matrix)
