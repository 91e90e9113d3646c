"""Mask2Former outputs to semantic label maps at the ground-truth size, for training-time evaluation and run_eval.py.

One rule for every path that scores a model: the rule of upstream ``post_process_semantic_segmentation``, which
``pipeline("image-segmentation", subtask="semantic")`` applies. Mask logits go to 384x384 (bilinear), their
sigmoids are weighted by the class probabilities, and the class scores go to the target size (bilinear) before the
argmax; so a model scores the same here, in run_eval.py and through ``pipeline()``. A batch's padding is cropped
away first (using the valid size read from ``pixel_mask``), so an image scores as it would alone. With a
``working_size`` the scores are taken at a capped size and the label map is resized with nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

TTA_CHOICES = ("none", "flip")
# The fixed size upstream post-processing resizes mask logits to, whatever the input size.
UPSTREAM_MASK_SIZE = (384, 384)


def valid_sizes_of(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
    """(height, width) of the real part of each image in a batch padded at the bottom and right."""
    rows = pixel_mask.any(dim=2).sum(dim=1)
    cols = pixel_mask.any(dim=1).sum(dim=1)
    return [(int(h), int(w)) for h, w in zip(rows.tolist(), cols.tolist(), strict=True)]


def working_target(target_size: tuple[int, int], working_size: int | None) -> tuple[int, int]:
    """``target_size`` shrunk (aspect kept) so its shortest edge is at most ``working_size``."""
    height, width = target_size
    if working_size is None or min(height, width) <= working_size:
        return height, width
    scale = working_size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def semantic_scores_for_image(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    valid_size: tuple[int, int] | None = None,
    input_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Class scores (C, 384, 384) of one image from its (Q, C+1) class and (Q, h, w) mask logits, as upstream.

    ``input_size`` is the padded (H, W) fed to the model and ``valid_size`` the unpadded part of the image in it;
    the padding is cropped away before the resize.
    """
    class_probs = class_queries_logits.softmax(dim=-1)[..., :-1]
    mask_logits = masks_queries_logits
    if valid_size is not None:
        if input_size is None:
            raise ValueError("valid_sizes needs the padded input_size")
        # Cut the padded border in mask resolution first: rows/cols proportional to the valid part.
        scale_h = mask_logits.shape[-2] / input_size[0]
        scale_w = mask_logits.shape[-1] / input_size[1]
        valid_h, valid_w = valid_size
        crop_h, crop_w = max(1, round(valid_h * scale_h)), max(1, round(valid_w * scale_w))
        mask_logits = mask_logits[:, :crop_h, :crop_w]
    mask_probs = torch.nn.functional.interpolate(
        mask_logits[None], size=UPSTREAM_MASK_SIZE, mode="bilinear", align_corners=False
    )[0].sigmoid()
    return torch.einsum("qc,qhw->chw", class_probs, mask_probs)


def label_map_at(scores: torch.Tensor, target_size: tuple[int, int], class_chunk: int = 8) -> torch.Tensor:
    """The argmax over classes of ``scores`` (C, h, w) resized bilinearly to ``target_size``, ``class_chunk`` at a time.

    Resizing acts on each class alone, so a few classes at a time give the very values (and ties, first class
    first) of resizing all at once, with memory for ``class_chunk`` full-size maps instead of C.
    """
    best_scores, best_classes = None, None
    for start in range(0, scores.shape[0], class_chunk):
        resized = torch.nn.functional.interpolate(
            scores[None, start: start + class_chunk], size=target_size, mode="bilinear", align_corners=False
        )[0]
        chunk_best, chunk_classes = resized.max(dim=0)
        if best_scores is None:
            best_scores, best_classes = chunk_best, chunk_classes
            continue
        better = chunk_best > best_scores
        best_scores = torch.where(better, chunk_best, best_scores)
        best_classes = torch.where(better, chunk_classes + start, best_classes)
    return best_classes


def semantic_maps_from_outputs(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]],
    valid_sizes: Sequence[tuple[int, int]] | None = None,
    input_size: tuple[int, int] | None = None,
    working_size: int | None = None,
    mirrored: bool = False,
) -> list[torch.Tensor]:
    """Per-image label maps at ``target_sizes``; see :func:`semantic_scores_for_image` for the other arguments.

    ``working_size`` caps the shortest edge at which scores are computed; the label map is then resized to the
    target with nearest neighbours. With ``mirrored`` the outputs hold twice as many images, the second half the
    horizontal mirrors of the first, and each map comes from the summed class scores of an image and its mirror.
    The maps are uint8 when every class id fits (at most 256 classes), int64 otherwise: a uint8 map is 8x smaller
    and is what the metric counts fastest.
    """
    if valid_sizes is not None and input_size is None:
        raise ValueError("valid_sizes needs the padded input_size")
    map_dtype = torch.uint8 if class_queries_logits.shape[-1] - 1 <= 256 else torch.long
    num_images = len(target_sizes)
    maps = []
    for index, target_size in enumerate(target_sizes):
        target_size = tuple(target_size)
        valid_size = None if valid_sizes is None else valid_sizes[index]
        scores = semantic_scores_for_image(
            class_queries_logits[index], masks_queries_logits[index], valid_size, input_size
        )
        if mirrored:
            # Mirroring the mirrored masks back puts the padding on the right again, where the crop expects it.
            mirror = num_images + index
            scores += semantic_scores_for_image(
                class_queries_logits[mirror], masks_queries_logits[mirror].flip(-1), valid_size, input_size
            )
        size = working_target(target_size, working_size)
        label_map = label_map_at(scores, size).to(map_dtype)
        if size != target_size:
            label_map = torch.nn.functional.interpolate(
                label_map[None, None].float(), size=target_size, mode="nearest-exact"
            )[0, 0].to(map_dtype)
        maps.append(label_map)
    return maps


def predict_batch(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    accelerator: Accelerator,
    tta: str = "none",
    working_size: int | None = None,
) -> list[torch.Tensor]:
    """Label maps on the accelerator's device, one per image at the size of its ``original_segmentation_maps``.

    ``tta="flip"`` also runs the horizontal mirror of every image and sums the class scores of both.
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    device = accelerator.device
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
    valid_sizes = valid_sizes_of(batch["pixel_mask"])
    if tta == "flip":
        pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        pixel_mask = torch.cat([pixel_mask, pixel_mask.flip(-1)])
    with accelerator.autocast():
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return semantic_maps_from_outputs(
        outputs.class_queries_logits.float(),
        outputs.masks_queries_logits.float(),
        target_sizes=[tuple(np.shape(label)[:2]) for label in batch["original_segmentation_maps"]],
        valid_sizes=valid_sizes,
        input_size=tuple(pixel_values.shape[-2:]),
        working_size=working_size,
        mirrored=tta == "flip",
    )
