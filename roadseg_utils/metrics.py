"""Streaming confusion-matrix metrics for semantic segmentation (mIoU and friends), as an offline `evaluate` module.

Semantics (DESIGN.md, "Metric semantics"): pixels whose reference is ``ignore_index`` are dropped; the confusion
matrix ``C`` is true x predicted; ``IoU_c = C_cc / (row_c + col_c - C_cc)``; a class whose denominator is zero is
NaN and left out of every mean. Coarser levels (IDD level 2 and 1) are scored from the same matrix by summing its
rows and columns into the coarse groups, as the official IDD evaluation does.

Counting is a 256 x 256 joint histogram of (reference, prediction) value pairs of uint8 maps per update. It needs no
masking pass (ignore pixels land in their own row), and any value outside the label set shows up as counts outside
the ``num_labels`` x ``num_labels`` block, so validation is free. Host maps are counted by OpenCV's two-channel
``calcHist``, split into a few flat chunks counted on a thread pool (OpenCV releases the GIL). Measured on this
project's 2-core CPU for a 1080x1920 map: ``calcHist`` in two threads ~2-3 ms, in one ~3.3 ms, ``np.bincount`` on
the combined uint16 code ``(reference << 8) | prediction`` ~6 ms (it widens the code to int64 first),
``torch.bincount`` on it ~9 ms (int32) to ~145 ms (int64), masking first and then counting ``26 * ref + pred``
~17 ms (numpy) / ~130 ms (torch). Tensors on an accelerator are counted with ``torch.bincount`` on their own device
and never leave it.

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
    # The caller counts the first chunk while the pool counts the rest: 2.0 against 2.5 ms per 1080x1920 map here.
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


def _as_confusion(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    counts = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square and non-empty, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"a confusion matrix holds integer counts, got dtype {counts.dtype}")
    if (counts < 0).any():
        raise ValueError("a confusion matrix cannot hold negative counts")
    return counts.astype(np.int64, copy=False)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator`` with NaN where the denominator is zero."""
    out = np.full(np.shape(denominator), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _mean_present(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def per_category_iou(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class IoU, C_cc / (row_c + col_c - C_cc); NaN for a class in neither references nor predictions."""
    counts = _as_confusion(confusion)
    hits = np.diag(counts)
    return _ratio(hits, counts.sum(axis=1) + counts.sum(axis=0) - hits)


def coarsen_confusion(confusion: np.ndarray | torch.Tensor, mapping: Mapping[int, int]) -> np.ndarray:
    """Sum the rows and columns of a fine confusion matrix into coarse groups given as ``{fine_id: coarse_id}``."""
    counts = _as_confusion(confusion)
    num_fine = counts.shape[0]
    missing = sorted(set(range(num_fine)) - {int(k) for k in mapping})
    if missing:
        raise ValueError(f"the coarse mapping has no group for fine classes {missing}")
    groups = np.array([int(mapping[fine]) for fine in range(num_fine)])
    if (groups < 0).any():
        raise ValueError(f"coarse ids must be non-negative, got {sorted(set(groups[groups < 0].tolist()))}")
    membership = np.zeros((num_fine, int(groups.max()) + 1), dtype=np.int64)
    membership[np.arange(num_fine), groups] = 1
    return membership.T @ counts @ membership


def constant_prediction_mean_iou(confusion: np.ndarray) -> float:
    """The mIoU of the best constant prediction (the most frequent true class everywhere): a floor to beat."""
    rows = np.asarray(confusion, dtype=np.float64).sum(axis=1)
    total, present = rows.sum(), np.count_nonzero(rows)
    # Predicting class c everywhere gives IoU_c = row_c / total, and 0 for every other class in the ground truth.
    return float(rows.max() / total / present) if total else float("nan")


def compute_segmentation_metrics(
    confusion: np.ndarray | torch.Tensor,
    id2label: Mapping[int, str] | None = None,
    coarser: Mapping[str, Mapping[int, int]] | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU and accuracy, pixel accuracy, mean accuracy, frequency-weighted IoU (+ coarser mIoUs).

    Per-class values are float64 arrays with NaN for classes whose denominator is zero; every mean leaves NaN out.
    With ``id2label``, also one float per class as ``iou_<name>`` and ``accuracy_<name>``. With ``coarser`` (e.g.
    ``LabelSet.coarser``), ``mean_iou_<level>`` and ``per_category_iou_<level>`` from the aggregated matrix.
    """
    counts = _as_confusion(confusion)
    num_labels = counts.shape[0]
    hits = np.diag(counts)
    reference_totals = counts.sum(axis=1)
    total = reference_totals.sum()
    iou = per_category_iou(counts)
    accuracy = _ratio(hits, reference_totals)
    # Classes with a NaN IoU have no reference pixels, hence zero weight.
    frequency = reference_totals / total if total else np.zeros(num_labels)
    results: dict[str, Any] = {
        "mean_iou": _mean_present(iou),
        "mean_accuracy": _mean_present(accuracy),
        "overall_accuracy": float(hits.sum() / total) if total else float("nan"),
        "frequency_weighted_iou": float(np.nansum(frequency * iou)) if total else float("nan"),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if id2label is not None:
        ids = {int(k) for k in id2label}
        if ids != set(range(num_labels)):
            raise ValueError(f"id2label must name the classes 0..{num_labels - 1}, got ids {sorted(ids)}")
        names = {int(k): str(v) for k, v in id2label.items()}
        for index in range(num_labels):
            results[f"iou_{names[index]}"] = float(iou[index])
            results[f"accuracy_{names[index]}"] = float(accuracy[index])
    for level, mapping in (coarser or {}).items():
        coarse_iou = per_category_iou(coarsen_confusion(counts, mapping))
        results[f"mean_iou_{level}"] = _mean_present(coarse_iou)
        results[f"per_category_iou_{level}"] = coarse_iou
    return results


def scalar_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Only the scalar entries of a metrics dict (what the Trainer logs), as Python floats."""
    return {key: float(value) for key, value in results.items() if np.ndim(value) == 0}


def _eval_pred_parts(eval_pred: Any) -> tuple[Any, Any]:
    if hasattr(eval_pred, "predictions") and hasattr(eval_pred, "label_ids"):
        return eval_pred.predictions, eval_pred.label_ids
    predictions, references = eval_pred
    return predictions, references


class BatchedSegmentationMetric:
    """A Trainer ``compute_metrics`` for ``batch_eval_metrics=True`` that streams maps into a confusion matrix.

    Each call takes ``eval_pred`` (an ``EvalPrediction`` or a ``(predictions, references)`` pair) whose predictions
    and label ids are per-image predicted and reference maps (lists of 2-D tensors, or (B, H, W) batches). It returns
    ``{}`` until ``compute_result`` is True, then the scalar metrics of everything seen, and starts over.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None = IGNORE_INDEX,
        id2label: Mapping[int, str] | None = None,
        coarser: Mapping[str, Mapping[int, int]] | None = None,
        device: str | torch.device | None = None,
    ):
        self.confusion = StreamingConfusionMatrix(num_labels, ignore_index, device)
        self.id2label = id2label
        self.coarser = coarser

    def __call__(self, eval_pred: Any, compute_result: bool = False) -> dict[str, float]:
        """Count this batch; on the last batch return the metrics (scalars only) and reset."""
        predictions, references = _eval_pred_parts(eval_pred)
        self.confusion.update(predictions, references)
        if not compute_result:
            return {}
        results = scalar_metrics(self.confusion.compute(self.id2label, self.coarser))
        self.confusion.reset()
        return results


_MEAN_IOU_DESCRIPTION = (
    "Mean intersection-over-union and related segmentation scores from a streaming confusion matrix. "
    "Predicted and reference maps are counted as they arrive and never stored, so it handles full-resolution maps."
)
_MEAN_IOU_INPUTS = """
Args:
    predictions: predicted label maps, one (H, W) integer map per image (tensors, arrays or nested lists).
    references: reference label maps of the same sizes; ``ignore_index`` pixels are skipped.
    num_labels: number of classes (may be given to ``load_mean_iou`` instead).
    ignore_index: reference value to skip (default 255).
    id2label: optional ``{id: name}`` adding ``iou_<name>`` / ``accuracy_<name>`` entries.
    coarser: optional ``{level: {fine_id: coarse_id}}`` adding ``mean_iou_<level>`` entries.
Returns:
    mean_iou, mean_accuracy, overall_accuracy, frequency_weighted_iou, per_category_iou, per_category_accuracy.
"""


@functools.cache
def _mean_iou_class() -> type:
    # Importing evaluate costs ~8 s here (it pulls in transformers.pipelines), so only the evaluate module pays it.
    import datasets
    import evaluate

    class MeanIoU(evaluate.Metric):
        """An offline ``evaluate`` metric that streams maps into a confusion matrix instead of an Arrow cache.

        Without ``num_labels`` at construction, maps are counted over all 256 uint8 values and ``compute`` checks
        them against its ``num_labels`` / ``ignore_index``. ``num_process > 1`` is refused: sum the matrices with
        ``all_reduce_confusion`` instead of evaluate's file-based gathering.
        """

        def __init__(
            self,
            num_labels: int | None = None,
            ignore_index: int | None = IGNORE_INDEX,
            id2label: Mapping[int, str] | None = None,
            coarser: Mapping[str, Mapping[int, int]] | None = None,
            device: str | torch.device | None = None,
            **kwargs: Any,
        ):
            super().__init__(**kwargs)
            if self.num_process != 1:
                raise ValueError(
                    "MeanIoU keeps counts, not predictions: run one instance per rank and sum the matrices with "
                    "roadseg_utils.metrics.all_reduce_confusion instead of num_process > 1"
                )
            if num_labels is not None:
                _check_label_space(num_labels, ignore_index)
            self.num_labels = num_labels
            self.ignore_index = ignore_index
            self.id2label = id2label
            self.coarser = coarser
            self.device = device
            self._counts: StreamingConfusionMatrix | None = None

        def _info(self) -> evaluate.MetricInfo:
            label_map = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
            return evaluate.MetricInfo(
                description=_MEAN_IOU_DESCRIPTION,
                citation="",
                inputs_description=_MEAN_IOU_INPUTS,
                features=datasets.Features({"predictions": label_map, "references": label_map}),
            )

        def __len__(self) -> int:
            return 0 if self._counts is None else self._counts.num_maps

        def _accumulator(
            self, num_labels: int | None = None, ignore_index: int | None = None
        ) -> StreamingConfusionMatrix:
            if self._counts is None:
                num_labels = num_labels if num_labels is not None else self.num_labels
                if num_labels is None:
                    self._counts = StreamingConfusionMatrix(NUM_CODES, None, self.device)
                else:
                    self._counts = StreamingConfusionMatrix(num_labels, ignore_index, self.device)
            return self._counts

        def add_batch(self, *, predictions: ArrayLike = None, references: ArrayLike = None) -> None:
            """Count a batch of predicted and reference maps (never stored)."""
            self._accumulator(ignore_index=self.ignore_index).update(predictions, references)

        def add(self, *, prediction: ArrayLike = None, reference: ArrayLike = None) -> None:
            """Count one predicted map and its reference."""
            self.add_batch(predictions=[prediction], references=[reference])

        def compute(
            self,
            *,
            predictions: ArrayLike = None,
            references: ArrayLike = None,
            num_labels: int | None = None,
            ignore_index: int | None = None,
            id2label: Mapping[int, str] | None = None,
            coarser: Mapping[str, Mapping[int, int]] | None = None,
        ) -> dict[str, Any]:
            """Metrics over everything added (plus ``predictions``/``references`` if given); then start over."""
            # Replaces evaluate's compute, which would gather predictions from an Arrow cache this module never writes.
            num_labels = num_labels if num_labels is not None else self.num_labels
            ignore_index = ignore_index if ignore_index is not None else self.ignore_index
            if num_labels is None:
                raise ValueError("num_labels is required: pass it to compute() or to load_mean_iou()")
            _check_label_space(num_labels, ignore_index)
            counts = self._accumulator(num_labels, ignore_index)
            if predictions is not None or references is not None:
                self.add_batch(predictions=predictions, references=references)
            if counts.num_labels == NUM_CODES and counts.ignore_index is None and num_labels != NUM_CODES:
                confusion = _confusion_from_joint(counts.matrix, num_labels, ignore_index)
            elif (counts.num_labels, counts.ignore_index) != (num_labels, ignore_index):
                raise ValueError(
                    f"maps were counted with num_labels={counts.num_labels}, ignore_index={counts.ignore_index}; "
                    f"compute() got num_labels={num_labels}, ignore_index={ignore_index}"
                )
            else:
                confusion = counts.matrix
            self._counts = None
            return compute_segmentation_metrics(
                confusion,
                id2label=id2label if id2label is not None else self.id2label,
                coarser=coarser if coarser is not None else self.coarser,
            )

    MeanIoU.__qualname__ = "MeanIoU"
    MeanIoU.__module__ = __name__
    return MeanIoU


def _confusion_from_joint(joint: np.ndarray, num_labels: int, ignore_index: int | None) -> np.ndarray:
    """The confusion matrix inside a 256 x 256 pair histogram, after checking nothing lies outside the label space."""
    message = _invalid_values_message(joint, num_labels, ignore_index)
    if message:
        raise ValueError(message)
    return joint[:num_labels, :num_labels].copy()


def load_mean_iou(
    num_labels: int | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    id2label: Mapping[int, str] | None = None,
    coarser: Mapping[str, Mapping[int, int]] | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> Any:
    """The ``MeanIoU`` evaluate module, built locally (no Hub access); ``kwargs`` go to ``evaluate.Metric``."""
    return _mean_iou_class()(
        num_labels=num_labels, ignore_index=ignore_index, id2label=id2label, coarser=coarser, device=device, **kwargs
    )


def __getattr__(name: str) -> Any:
    if name == "MeanIoU":
        return _mean_iou_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
