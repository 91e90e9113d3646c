"""The six-key collator: transformed examples to a Mask2Former batch plus the originals for evaluation.

Masks are built vectorised: the classes present in an image come from a 256-bin histogram of its uint8
label map (OpenCV; an order of magnitude cheaper than ``torch.unique``, which sorts), and all its binary masks
from one broadcast comparison. They stay bool (or uint8) on the host; the trainer casts them to the model's float
dtype on the device. float32 masks would take 4x the memory and, built here, ~18x the time
(``python -m benchmarks.bench_collator``).

Memory. A batch of 8 crops of 512x1024 is ~170 MB (pixel values, pixel mask, bool masks). Fresh memory of that
size comes from the OS page by page, and those page faults cost more than the writes themselves. So every batch is
carved from one block of a per-process :class:`HostBufferPool`, and the block is reused once nothing refers to any
of its arrays any more (the trainer moved the batch to the device, pinned it, or dropped it); BENCHMARKS.md has the
figures with and without this reuse (``python -m benchmarks.bench_collator``).

Padding. ``pixel_mask`` is 1 on real pixels and 0 on padding: padding added by the transform when an image is
smaller than the crop (known exactly from the transform's ``valid`` map), and, in evaluation batches of images of
different sizes, the bottom/right padding up to the largest image (pixel values 0, label 255). Training crops
have a fixed size, so a training batch needs no padding between images. Upstream Mask2Former (transformers 5.24)
accepts ``pixel_mask`` but reads it nowhere, neither in the network nor in the loss. Padded pixels carry label
255, and a 255 pixel is 0 in every binary mask: the mask losses see it as belonging to none of the image's
classes. That is how the reference implementation and ``Mask2FormerImageProcessor`` treat ignored pixels, so
"ignored" means "in no mask", not "left out of the loss"; keeping padding to the few crops smaller than the crop
size keeps this effect small.

Images without a labelled pixel. When a crop holds only 255, image i gets ``mask_labels[i]`` of shape
(0, H, W) and ``class_labels[i]`` of shape (0,). The image stays in the batch and is not given a fake mask
(an all-false mask of some class would teach that the class is absent). transformers 5.24 handles such a
target without error: ``Mask2FormerHungarianMatcher`` hands scipy a (num_queries, 0) cost matrix and gets an
empty assignment, ``loss_masks`` has no pair to score for that image, and ``loss_labels`` supervises all its
queries towards the no-object class, down-weighted by ``config.no_object_weight``; the loss is normalised by the
number of masks in the batch, clamped to at least 1. So such an image contributes a 'no-object-only' target,
which is also what the reference implementation does with images without instances. tests/test_collator.py
runs forward and backward through a tiny model on batches with such a crop to keep this true.

Dropped samples. An evaluation dataset wrapped in ``BadSampleGuard(..., substitute=False)`` yields None for a bad
sample it skips. The collator keeps its place as a placeholder (zeros, ``pixel_mask`` 0, label all 255, and None in
both ``original_*`` lists), so a batch keeps its length: DDP's gather of per-image results needs equal batches on
every process, and a caller that maps batch positions to dataset indices stays aligned. The trainer leaves
placeholders out of the forward pass, the confusion matrix and the image count.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .labels import IGNORE_INDEX, pixel_counts

logger = logging.get_logger(__name__)

NUM_BINS = 256
ALIGNMENT = 64
PLACEHOLDER_SIZE = 32
MODEL_INPUT_KEYS = ("pixel_values", "pixel_mask", "mask_labels", "class_labels")
BATCH_KEYS = (*MODEL_INPUT_KEYS, "original_images", "original_segmentation_maps")


def present_classes(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Sorted label ids that occur in a uint8 label map, ignore excluded, from a 256-bin histogram."""
    counts = pixel_counts(np.asarray(label, dtype=np.uint8))
    counts[ignore_index] = 0
    return np.flatnonzero(counts)


def binary_masks(label: np.ndarray, classes: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
    """One bool (N, H, W) mask per class id in ``classes``, built in a single broadcast comparison (into ``out``)."""
    # NumPy's broadcast comparison on uint8 is ~9x faster than torch's here (benchmarks/bench_collator.py).
    masks = np.equal(label[None], classes.astype(label.dtype)[:, None, None], out=out)
    return torch.from_numpy(masks)


class HostBufferPool:
    """Host memory for batches, handed out in blocks; a block is reused once no array carved from it is alive.

    Liveness is exact: every carved array is a view of one per-block arena, and torch tensors made from those views
    (and their slices) keep the arena alive, so a block comes back only when its last view has been freed. At most
    ``max_idle_blocks`` blocks wait for reuse; the others go back to the OS.
    """

    def __init__(self, max_idle_blocks: int = 2, headroom: float = 1.25):
        self.max_idle_blocks = max_idle_blocks
        self.headroom = headroom
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    def carve(self, layouts: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
        """Uninitialised arrays of the given (shape, dtype) pairs, all from one block."""
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in layouts]
        offsets = np.cumsum([0] + [-(-size // ALIGNMENT) * ALIGNMENT for size in sizes]).tolist()
        block = self._take(offsets[-1])
        start = -block.ctypes.data % ALIGNMENT
        arena = np.frombuffer(memoryview(block)[start : start + offsets[-1]], dtype=np.uint8)
        weakref.finalize(arena, self._give_back, block)
        return [
            arena[offset : offset + size].view(dtype).reshape(shape)
            for offset, size, (shape, dtype) in zip(offsets, sizes, layouts, strict=False)
        ]

    @property
    def idle_bytes(self) -> int:
        """Bytes held in blocks waiting for reuse."""
        with self._lock:
            return sum(block.nbytes for block in self._idle)

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fitting = [i for i, block in enumerate(self._idle) if block.nbytes >= nbytes + ALIGNMENT]
            if fitting:
                return self._idle.pop(min(fitting, key=lambda i: self._idle[i].nbytes))
        # Headroom lets the next batch, with a few more masks, fit the same block.
        return np.empty(int(nbytes * self.headroom) + ALIGNMENT, dtype=np.uint8)

    def _give_back(self, block: np.ndarray) -> None:
        with self._lock:
            self._idle.append(block)
            self._idle.sort(key=lambda candidate: candidate.nbytes, reverse=True)
            del self._idle[self.max_idle_blocks :]


@functools.lru_cache(maxsize=1)
def _process_pool(process_id: int) -> HostBufferPool:
    """The buffer pool of one process (keyed by pid, so that a forked data-loader worker starts its own)."""
    return HostBufferPool()


def host_buffer_pool() -> HostBufferPool:
    """The current process's pool that collated batches are carved from."""
    return _process_pool(os.getpid())


def _as_uint8_label(label: Any, source: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{source}: label must be a 2-D map, got shape {label.shape}")
    if label.dtype == np.uint8:
        return label
    if label.size and (label.min() < 0 or label.max() >= NUM_BINS):
        raise ValueError(f"{source}: label ids must lie in 0..255, got {label.min()}..{label.max()}")
    return label.astype(np.uint8)


@dataclass
class SegmentationCollator:
    """Collate examples from ``SegmentationTransform`` into the six keys of the design's batch contract.

    Only ``MODEL_INPUT_KEYS`` go to ``model.forward``. The two ``original_*`` lists hold one entry per example, or
    are empty when the transform ran with ``keep_originals=False`` (training, where they would only cost memory);
    a None example (a dropped bad sample) becomes a placeholder, None in both lists (module docstring).
    ``mask_dtype`` is ``torch.bool`` (default) or ``torch.uint8``. With ``num_labels`` set, a label id outside
    0..num_labels-1 (other than ``ignore_index``) raises a ValueError naming the example, instead of failing later
    inside the model's loss.
    """

    ignore_index: int = IGNORE_INDEX
    mask_dtype: torch.dtype = torch.bool
    num_labels: int | None = None
    # Inference needs no loss targets: without them ``mask_labels`` and ``class_labels`` are empty lists.
    with_targets: bool = True

    def __post_init__(self) -> None:
        if self.mask_dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"mask_dtype must be torch.bool or torch.uint8, got {self.mask_dtype}")
        if not 0 <= self.ignore_index < NUM_BINS:
            raise ValueError(f"ignore_index must lie in 0..255 for uint8 label maps, got {self.ignore_index}")

    def placeholders_for(self, examples: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """The examples with each None (a dropped bad sample) replaced by a placeholder that holds its place."""
        template = next((example for example in examples if example is not None), None)
        if template is None:
            shape, with_originals = (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), True
        else:
            shape, with_originals = np.shape(template["label"]), "original_label" in template
        placeholder = {
            "pixel_values": np.zeros((3, *shape), dtype=np.float32),
            "label": np.full(shape, self.ignore_index, dtype=np.uint8),
            "valid": np.zeros(shape, dtype=np.uint8),
            "path": "dropped sample",
        }
        if with_originals:
            placeholder.update(original_image=None, original_label=None)
        return [placeholder if example is None else example for example in examples]

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Stack, pad to the largest example, and build per-image binary masks and class ids."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if any(example is None for example in examples):
            examples = self.placeholders_for(examples)
        sources = [str(example.get("path", f"example {i}")) for i, example in enumerate(examples)]
        images = [np.asarray(example["pixel_values"], dtype=np.float32) for example in examples]
        labels = [_as_uint8_label(example["label"], source) for example, source in zip(examples, sources, strict=True)]
        valids = [
            np.asarray(example["valid"], dtype=np.uint8) if "valid" in example else np.ones_like(label)
            for example, label in zip(examples, labels, strict=True)
        ]
        for image, label, valid, source in zip(images, labels, valids, sources, strict=True):
            if image.ndim != 3 or image.shape[0] != 3 or image.shape[1:] != label.shape or valid.shape != label.shape:
                raise ValueError(
                    f"{source}: expected pixel_values (3,H,W) with label and valid (H,W), got {image.shape}, "
                    f"{label.shape}, {valid.shape}"
                )

        batch_size = len(examples)
        height = max(label.shape[0] for label in labels)
        width = max(label.shape[1] for label in labels)
        # Fixed-size training crops never need padding here; evaluation images of different sizes do.
        needs_padding = any(label.shape != (height, width) for label in labels)
        image_classes = []
        if self.with_targets:
            for label, source in zip(labels, sources, strict=True):
                classes = present_classes(label, self.ignore_index)
                if self.num_labels is not None and classes.size and classes[-1] >= self.num_labels:
                    unknown = classes[classes >= self.num_labels].tolist()
                    raise ValueError(f"{source}: label ids {unknown} outside 0..{self.num_labels - 1} (ignore is 255)")
                if not classes.size:
                    logger.debug("%s: no labelled pixel in this crop; it gets a no-object-only target", source)
                image_classes.append(classes)

        pixel_values, pixel_mask, *masks = host_buffer_pool().carve(
            [((batch_size, 3, height, width), np.float32), ((batch_size, height, width), np.int64)]
            + [((classes.size, height, width), np.bool_) for classes in image_classes]
        )
        if needs_padding:
            pixel_values.fill(0)
            pixel_mask.fill(0)
        mask_labels, class_labels = [], []
        for i, (image, label, valid) in enumerate(zip(images, labels, valids, strict=True)):
            h, w = label.shape
            pixel_values[i, :, :h, :w] = image
            pixel_mask[i, :h, :w] = valid
            if not self.with_targets:
                continue
            if (h, w) != (height, width):
                padded = np.full((height, width), self.ignore_index, dtype=np.uint8)
                padded[:h, :w] = label
                label = padded
            classes = image_classes[i]
            image_masks = binary_masks(label, classes, out=masks[i])
            mask_labels.append(image_masks if self.mask_dtype == torch.bool else image_masks.view(torch.uint8))
            class_labels.append(torch.from_numpy(classes.astype(np.int64)))

        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "pixel_mask": torch.from_numpy(pixel_mask),
            "mask_labels": mask_labels,
            "class_labels": class_labels,
            "original_images": [example["original_image"] for example in examples if "original_image" in example],
            "original_segmentation_maps": [
                example["original_label"] for example in examples if "original_label" in example
            ],
        }
