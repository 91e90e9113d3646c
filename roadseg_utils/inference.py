"""Mask2Former outputs to semantic label maps at the ground-truth size, for training-time evaluation and run_eval.py.

Mask logits are upsampled straight to each target size (or to a capped working size, then resized with nearest
neighbours), never through the fixed 384x384 step of upstream ``post_process_semantic_segmentation``, which blurs
thin classes at 1080p. The padding of a batch is cropped away first, using the valid size read from ``pixel_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

TTA_CHOICES = ("none", "flip")


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
    target_size: tuple[int, int],
    valid_size: tuple[int, int] | None = None,
    input_size: tuple[int, int] | None = None,
    query_chunk: int = 16,
) -> torch.Tensor:
    """Class scores (C, H, W) of one image at ``target_size`` from its (Q, C+1) class and (Q, h, w) mask logits.

    Mask logits are upsampled ``query_chunk`` queries at a time, so a 1080p map needs memory for the class scores,
    not for every query at full size. ``input_size`` is the padded (H, W) fed to the model and ``valid_size`` the
    unpadded part of the image in it; the padding is cropped away before the resize.
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
    scores = None
    for start in range(0, mask_logits.shape[0], query_chunk):
        upsampled = torch.nn.functional.interpolate(
            mask_logits[None, start : start + query_chunk], size=target_size, mode="bilinear", align_corners=False
        )[0].sigmoid()
        chunk_scores = torch.einsum("qc,qhw->chw", class_probs[start : start + query_chunk], upsampled)
        scores = chunk_scores if scores is None else scores + chunk_scores
    return scores


def semantic_maps_from_outputs(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]],
    valid_sizes: Sequence[tuple[int, int]] | None = None,
    input_size: tuple[int, int] | None = None,
    working_size: int | None = None,
    mirrored: bool = False,
    query_chunk: int = 16,
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
        size = working_target(target_size, working_size)
        scores = semantic_scores_for_image(
            class_queries_logits[index], masks_queries_logits[index], size, valid_size, input_size, query_chunk
        )
        if mirrored:
            # Mirroring the mirrored masks back puts the padding on the right again, where the crop expects it.
            mirror = num_images + index
            scores += semantic_scores_for_image(
                class_queries_logits[mirror], masks_queries_logits[mirror].flip(-1), size, valid_size, input_size,
                query_chunk,
            )
        label_map = scores.argmax(dim=0).to(map_dtype)
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
