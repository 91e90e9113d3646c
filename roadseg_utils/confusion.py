"""Counting a segmentation confusion matrix map by map (StreamingConfusionMatrix), and summing it over ranks.

The metrics computed from the matrix live in `metrics`. Semantics: docs/DESIGN.md, "Metric semantics".

Counting is a 256 x 256 joint histogram of (reference, prediction) value pairs of uint8 maps per update. It needs no
masking pass (ignore pixels land in their own row), and any value outside the label set shows up as counts outside
the ``num_labels`` x ``num_labels`` block, so validation is free. Host maps are counted by OpenCV's two-channel
``calcHist``, split into a few flat chunks counted on a thread pool (OpenCV releases the GIL); it beat
``np.bincount`` and ``torch.bincount`` on the combined code ``(reference << 8) | prediction`` and masking before
counting (see BENCHMARKS.md). Tensors on an accelerator are counted with ``torch.bincount`` on their own device and
never leave it.

Distributed use: in the ``Trainer`` with ``batch_eval_metrics=True`` the predictions and labels handed to
``compute_metrics`` are already gathered from every rank, so each rank's matrix is complete and must not be summed
again. In a custom loop where each rank sees only its shard, sum the matrices with :func:`all_reduce_confusion`
before computing the metrics.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch

from .labels import IGNORE_INDEX
from .metrics import compute_segmentation_metrics

NUM_CODES = 256
OUT_OF_RANGE_BIN = NUM_CODES * NUM_CODES
MAX_CHUNK_PIXELS = 1 << 23
# Below ~250k pixels a chunk costs less than handing it to another thread.
MIN_THREADED_CHUNK_PIXELS = 1 << 18

ArrayLike = Any


def _check_label_space(num_labels: int, ignore_index: int | None) -> None:
    if not isinstance(num_labels, (int, np.integer)) or not 1 <= num_labels <= NUM_CODES:
        raise ValueError(f"num_labels must be an integer in [1, {NUM_CODES}], got {num_labels!r}")
    if ignore_index is not None and not num_labels <= ignore_index < NUM_CODES:
        raise ValueError(
            f"ignore_index must be None or an integer in [num_labels, {NUM_CODES - 1}] = [{num_labels}, "
            f"{NUM_CODES - 1}], got {ignore_index!r} (remap other ignore values, e.g. -100, to 255 first)"
        )


def _require_integer(values: np.ndarray | torch.Tensor, role: str) -> None:
    if isinstance(values, torch.Tensor):
        is_integer = not (values.is_floating_point() or values.is_complex())
    else:
        is_integer = np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_
    if not is_integer:
        raise ValueError(f"{role} must hold integer class ids, got dtype {values.dtype} (take the argmax first)")


def _host_uint8(values: np.ndarray, role: str) -> np.ndarray:
    """``values`` as uint8, or a ValueError naming ``role`` when they fall outside [0, 255]."""
    _require_integer(values, role)
    if values.dtype == np.uint8:
        return values
    if values.size and values.dtype != np.bool_:
        low, high = values.min(), values.max()
        if low < 0 or high >= NUM_CODES:
            raise ValueError(f"{role} hold values outside [0, {NUM_CODES - 1}] (min {low}, max {high})")
    return values.astype(np.uint8)


def _pair_histogram(references: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    counts = cv2.calcHist([references, predictions], [0, 1], None, [NUM_CODES, NUM_CODES], [0, NUM_CODES] * 2)
    return counts.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _histogram_pool(process_id: int, num_threads: int) -> ThreadPoolExecutor:
    """The thread pool of one process (keyed by pid: a pool inherited through fork has no threads behind it)."""
    return ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="roadseg-metric")


def joint_counts_numpy(predictions: np.ndarray, references: np.ndarray) -> np.ndarray:
    """A (256, 256) int64 histogram of (reference, prediction) value pairs over two equally shaped host maps."""
    refs = np.ascontiguousarray(_host_uint8(references, "references")).reshape(-1)
    preds = np.ascontiguousarray(_host_uint8(predictions, "predictions")).reshape(-1)
    if not refs.size:
        return np.zeros((NUM_CODES, NUM_CODES), dtype=np.int64)
    # calcHist counts in float32, exact below 2**24 per bin; chunks of at most MAX_CHUNK_PIXELS keep it exact.
    num_threads = max(1, cv2.getNumThreads())
    num_chunks = max(-(-refs.size // MAX_CHUNK_PIXELS), min(num_threads, refs.size // MIN_THREADED_CHUNK_PIXELS))
    bounds = np.linspace(0, refs.size, num_chunks + 1).astype(np.int64)
    chunks = [(refs[start:stop], preds[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    if num_threads == 1:
        return sum(_pair_histogram(ref_chunk, pred_chunk) for ref_chunk, pred_chunk in chunks)
    # The caller counts the first chunk while the pool counts the rest, which beat handing every chunk to the pool.
    pool = _histogram_pool(os.getpid(), num_threads)
    pending = [pool.submit(_pair_histogram, ref_chunk, pred_chunk) for ref_chunk, pred_chunk in chunks[1:]]
    counts = _pair_histogram(*chunks[0])
    for future in pending:
        counts += future.result()
    return counts


def joint_counts_torch(predictions: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (256, 256) pair histogram on the inputs' device, and the count of values outside [0, 255] (no sync)."""
    _require_integer(predictions, "predictions")
    _require_integer(references, "references")
    refs, preds = references.reshape(-1).to(torch.long), predictions.reshape(-1).to(torch.long)
    codes = (refs << 8) | preds
    if references.dtype != torch.uint8 or predictions.dtype != torch.uint8:
        # One extra bin instead of a min/max per tensor keeps the check on the device, with no host sync;
        # a value outside [0, 255] (negative ones included) has bits above the lowest eight.
        out_of_range = ((refs | preds) >> 8) != 0
        codes = codes.masked_fill(out_of_range, OUT_OF_RANGE_BIN)
    counts = torch.bincount(codes, minlength=OUT_OF_RANGE_BIN + 1)
    return counts[:OUT_OF_RANGE_BIN].reshape(NUM_CODES, NUM_CODES), counts[OUT_OF_RANGE_BIN]


def _invalid_values_message(joint: np.ndarray, num_labels: int, ignore_index: int | None) -> str | None:
    allowed_refs = np.zeros(NUM_CODES, dtype=bool)
    allowed_refs[:num_labels] = True
    if ignore_index is not None:
        allowed_refs[ignore_index] = True
    bad_refs = np.flatnonzero((joint.sum(axis=1) > 0) & ~allowed_refs)
    bad_preds = np.flatnonzero(joint[:, num_labels:].sum(axis=0) > 0) + num_labels
    problems = []
    if bad_refs.size:
        problems.append(
            f"references hold values {bad_refs.tolist()} outside [0, {num_labels}) that are not "
            f"ignore_index={ignore_index}"
        )
    if bad_preds.size:
        problems.append(f"predictions hold values {bad_preds.tolist()} outside [0, {num_labels})")
    return "; ".join(problems) or None


def _is_map(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _paired_maps(predictions: Any, references: Any) -> list[tuple[Any, Any]]:
    """Pairs of equally shaped maps: one (H, W) map or (B, H, W) batch each, or two equally long sequences of maps."""
    if _is_map(predictions) and _is_map(references):
        if tuple(predictions.shape) != tuple(references.shape):
            raise ValueError(
                f"predictions have shape {tuple(predictions.shape)} but references have {tuple(references.shape)}"
            )
        if predictions.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) maps or (B, H, W) batches, got shape {tuple(predictions.shape)}")
        return [(predictions, references)]
    if isinstance(predictions, (str, bytes)) or isinstance(references, (str, bytes)):
        raise ValueError("predictions and references must be maps or sequences of maps, not strings")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predicted maps but {len(references)} reference maps")
    pairs = []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        prediction = prediction if _is_map(prediction) else np.asarray(prediction)
        reference = reference if _is_map(reference) else np.asarray(reference)
        if prediction.ndim != 2 or tuple(prediction.shape) != tuple(reference.shape):
            raise ValueError(
                f"predictions[{index}] has shape {tuple(prediction.shape)} and references[{index}] has "
                f"{tuple(reference.shape)}: expected two 2-D maps of the same size"
            )
        pairs.append((prediction, reference))
    return pairs


def _accelerator_device(prediction: Any, reference: Any) -> torch.device | None:
    for value in (prediction, reference):
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return None


def _to_host(value: np.ndarray | torch.Tensor) -> np.ndarray:
    return value.detach().numpy() if isinstance(value, torch.Tensor) else value


class StreamingConfusionMatrix:
    """A ``num_labels`` x ``num_labels`` int64 confusion matrix (true x predicted) accumulated map by map.

    ``update`` takes torch tensors (on any device), numpy arrays or nested lists: one (H, W) map, a (B, H, W)
    batch, or sequences of 2-D maps of different sizes. Only counts are kept, never the maps. Reference pixels equal
    to ``ignore_index`` are skipped; any other reference value outside [0, num_labels), and any predicted value
    outside it (ignored pixels included), raises ValueError and leaves the matrix unchanged. The matrix lives on
    ``device`` (default: the device of the first tensor counted on an accelerator, else the CPU).
    """

    def __init__(
        self, num_labels: int, ignore_index: int | None = IGNORE_INDEX, device: str | torch.device | None = None
    ):
        _check_label_space(num_labels, ignore_index)
        self.num_labels = int(num_labels)
        self.ignore_index = ignore_index
        self._device_fixed = device is not None
        self._matrix = torch.zeros((self.num_labels, self.num_labels), dtype=torch.long, device=device)
        self.num_maps = 0

    @property
    def device(self) -> torch.device:
        """Where the matrix is accumulated."""
        return self._matrix.device

    @property
    def matrix(self) -> np.ndarray:
        """A host copy of the int64 confusion matrix (rows: reference class, columns: predicted class)."""
        return self._matrix.cpu().numpy().copy()

    @property
    def matrix_tensor(self) -> torch.Tensor:
        """The accumulated int64 matrix itself, on ``device`` (for collective operations)."""
        return self._matrix

    def reset(self) -> StreamingConfusionMatrix:
        """Zero the counts."""
        self._matrix.zero_()
        self.num_maps = 0
        return self

    def update(self, predictions: ArrayLike, references: ArrayLike) -> StreamingConfusionMatrix:
        """Count the pixels of one map, one batch, or a sequence of maps; all validated before anything is added."""
        host_joint = None
        device_joint = None
        device_out_of_range = None
        pairs = _paired_maps(predictions, references)
        for prediction, reference in pairs:
            device = _accelerator_device(prediction, reference)
            if device is None:
                counts = joint_counts_numpy(_to_host(prediction), _to_host(reference))
                host_joint = counts if host_joint is None else host_joint + counts
                continue
            counts, out_of_range = joint_counts_torch(
                torch.as_tensor(prediction, device=device), torch.as_tensor(reference, device=device)
            )
            if device_joint is None:
                device_joint, device_out_of_range = counts, out_of_range
            else:
                device_joint = device_joint + counts.to(device_joint.device)
                device_out_of_range = device_out_of_range + out_of_range.to(device_joint.device)
        blocks = []
        if device_joint is not None:
            blocks.append(self._valid_block_on_device(device_joint, device_out_of_range))
            if not self._device_fixed:
                self._matrix = self._matrix.to(device_joint.device)
                self._device_fixed = True
        if host_joint is not None:
            blocks.append(self._valid_block_on_host(host_joint))
        for block in blocks:
            self._matrix += block.to(self._matrix.device)
        self.num_maps += sum(1 if prediction.ndim == 2 else prediction.shape[0] for prediction, _ in pairs)
        return self

    def _valid_block_on_host(self, joint: np.ndarray) -> torch.Tensor:
        message = _invalid_values_message(joint, self.num_labels, self.ignore_index)
        if message:
            raise ValueError(message)
        return torch.from_numpy(np.ascontiguousarray(joint[: self.num_labels, : self.num_labels]))

    def _valid_block_on_device(self, joint: torch.Tensor, out_of_range: torch.Tensor) -> torch.Tensor:
        n = self.num_labels
        block = joint[:n, :n]
        invalid = out_of_range + joint.sum() - block.sum()
        if self.ignore_index is not None:
            invalid = invalid - joint[self.ignore_index, :n].sum()
        # The only host sync of an update on an accelerator: one scalar.
        if invalid.item():
            if out_of_range.item():
                raise ValueError(f"predictions or references hold values outside [0, {NUM_CODES - 1}]")
            raise ValueError(_invalid_values_message(joint.cpu().numpy(), n, self.ignore_index))
        return block

    def add_matrix(self, matrix: np.ndarray | torch.Tensor) -> StreamingConfusionMatrix:
        """Add a (num_labels, num_labels) matrix of non-negative integer counts, e.g. another rank's."""
        counts = torch.as_tensor(matrix)
        if tuple(counts.shape) != (self.num_labels, self.num_labels):
            raise ValueError(
                f"expected a ({self.num_labels}, {self.num_labels}) confusion matrix, got shape {tuple(counts.shape)}"
            )
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise ValueError(f"a confusion matrix holds integer counts, got dtype {counts.dtype}")
        if bool((counts < 0).any()):
            raise ValueError("a confusion matrix cannot hold negative counts")
        self._matrix += counts.to(device=self._matrix.device, dtype=torch.long)
        return self

    def merge(self, other: StreamingConfusionMatrix) -> StreamingConfusionMatrix:
        """Add the counts of another accumulator over the same label space."""
        if (other.num_labels, other.ignore_index) != (self.num_labels, self.ignore_index):
            raise ValueError(
                f"cannot merge a matrix over num_labels={other.num_labels}, ignore_index={other.ignore_index} into "
                f"one over num_labels={self.num_labels}, ignore_index={self.ignore_index}"
            )
        self.add_matrix(other.matrix_tensor)
        self.num_maps += other.num_maps
        return self

    def compute(
        self, id2label: Mapping[int, str] | None = None, coarser: Mapping[str, Mapping[int, int]] | None = None
    ) -> dict[str, Any]:
        """:func:`compute_segmentation_metrics` of the counts so far."""
        return compute_segmentation_metrics(self.matrix, id2label=id2label, coarser=coarser)


def all_reduce_confusion(matrix: np.ndarray | torch.Tensor, accelerator: Any = None) -> np.ndarray | torch.Tensor:
    """The sum of ``matrix`` over all ranks (via ``accelerator.reduce`` or an initialised torch.distributed).

    Returns the same kind of object it was given (numpy array, or tensor on the input's device); with one process
    or no distributed setup it returns a copy. Call it once per evaluation in a custom loop where each rank counted
    only its own shard; do not call it on matrices built from the Trainer's already gathered predictions.
    """
    as_numpy = isinstance(matrix, np.ndarray)
    tensor = torch.as_tensor(matrix).to(torch.long).clone()
    source_device = tensor.device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if accelerator is not None and accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor.to(accelerator.device), reduction="sum")
    elif accelerator is None and distributed and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl" and tensor.device.type != "cuda":
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    tensor = tensor.to(source_device)
    return tensor.numpy() if as_numpy else tensor
