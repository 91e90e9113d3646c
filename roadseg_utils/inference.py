"""Mask2Former outputs to semantic label maps at the ground-truth size, for training-time evaluation and run_eval.py.

One rule for every path that scores a model: the rule of upstream ``post_process_semantic_segmentation``, which
``pipeline("image-segmentation", subtask="semantic")`` applies. Mask logits go to 384x384 (bilinear), their
sigmoids are weighted by the class probabilities, and the class scores go to the target size (bilinear) before the
argmax; so a model scores the same here, in run_eval.py and through ``pipeline()``. A batch's padding is cropped
away first (using the valid size read from ``pixel_mask``), so an image scores as it would alone. With a
``working_size`` the scores are taken at a capped size and the label map is resized with nearest neighbours.

Multi-scale test-time augmentation (``scales``, optionally with the mirror of each scale) runs one view at a time,
turns its outputs into class scores on the common 384x384 grid at once, adds them up and frees the outputs before
the next view, so no more than one view's logits are held; the average of the views then goes through the same
final resize and argmax. A view larger than the single-scale input runs in full-height strips no larger than that
input (``tile_pixels``), so the largest forward pass, which sets the peak memory, is the single-scale one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

TTA_CHOICES = ("none", "flip")
# The fixed size upstream post-processing resizes mask logits to, whatever the input size.
UPSTREAM_MASK_SIZE = (384, 384)
# Each scale costs a forward pass per image (two with flip); the papers' setting has six.
MAX_TTA_SCALES = 8
# Mask2FormerImageProcessor's default size_divisor: Swin's four stages downsample by 32 in all.
SIZE_DIVISOR = 32


def parse_tta_scales(value: str | Sequence[float]) -> tuple[float, ...]:
    """Scales from ``"0.5,1.0,1.5"`` (or a list of numbers): 1 to MAX_TTA_SCALES distinct, positive, finite."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        scales = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise ValueError(f"expected comma-separated numbers such as 0.5,1.0,1.5, got {value!r}") from None
    if not 1 <= len(scales) <= MAX_TTA_SCALES:
        raise ValueError(f"expected 1 to {MAX_TTA_SCALES} scales, got {len(scales)} in {value!r}")
    if not all(math.isfinite(scale) and scale > 0 for scale in scales):
        raise ValueError(f"every scale must be a positive finite number, got {value!r}")
    if len(set(scales)) != len(scales):
        # A repeated scale would silently count twice in the average.
        raise ValueError(f"a scale is repeated in {value!r}")
    return scales


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


def finish_label_map(
    scores: torch.Tensor, target_size: tuple[int, int], working_size: int | None, map_dtype: torch.dtype
) -> torch.Tensor:
    """The label map of class scores (C, h, w) at ``target_size``, scored at ``working_size`` when that caps it."""
    size = working_target(target_size, working_size)
    label_map = label_map_at(scores, size).to(map_dtype)
    if size != target_size:
        label_map = torch.nn.functional.interpolate(
            label_map[None, None].float(), size=target_size, mode="nearest-exact"
        )[0, 0].to(map_dtype)
    return label_map


def label_map_dtype(num_classes: int) -> torch.dtype:
    """The map dtype: uint8 when every class id fits (at most 256 classes, 8x smaller, counted fastest), else int64."""
    return torch.uint8 if num_classes <= 256 else torch.long


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
    map_dtype = label_map_dtype(class_queries_logits.shape[-1] - 1)
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
        maps.append(finish_label_map(scores, target_size, working_size, map_dtype))
    return maps


def scaled_side(side: int, scale: float, size_divisor: int = SIZE_DIVISOR) -> int:
    """``side`` times ``scale``, rounded up to a multiple of ``size_divisor``; scale 1.0 keeps the side as it is.

    Rounding up is what Mask2FormerImageProcessor does to every side it resizes (it stretches, it does not pad), so
    each scale feeds the model an input of the kind the processor makes, and no side falls below ``scale`` times its
    size. Scale 1.0 is the processor's own input, untouched, even when it was not resized (``do_resize=False``).
    """
    if scale == 1.0:
        return side
    # Rounded to 6 places first: 320 * 1.1 is 352.00000000000006 in floating point, which must stay 352, not 384.
    return max(size_divisor, math.ceil(round(side * scale / size_divisor, 6)) * size_divisor)


def scale_batch(
    pixel_values: torch.Tensor, valid_sizes: Sequence[tuple[int, int]], scale: float
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """``pixel_values`` (B, 3, H, W) with each image's valid part resized by ``scale``: values, mask, valid sizes.

    Each image is resized alone from its valid part (bilinear with antialiasing, as the processor's own resize, on
    the normalised tensor) and padded again at the bottom and right with zeros, so its border never blends with
    another image's padding and the scaled image scores as it would alone. The mask is 1 on each image's new valid
    part: exactly what nearest-neighbour resizing of the old one gives, without its rounding at the edge.
    """
    if scale == 1.0:
        # Bitwise the single-scale input (and with it, the single-scale label maps).
        height, width = pixel_values.shape[-2:]
        sizes = list(valid_sizes)
    else:
        sizes = [(scaled_side(h, scale), scaled_side(w, scale)) for h, w in valid_sizes]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    # uint8, not the batch's int64: the model reads no pixel_mask (docs/DESIGN.md), and at 1.75x of 1080p an int64
    # mask would be 50 MiB held through the forward pass.
    pixel_mask = torch.zeros((len(sizes), height, width), dtype=torch.uint8, device=pixel_values.device)
    for index, (new_h, new_w) in enumerate(sizes):
        pixel_mask[index, :new_h, :new_w] = 1
    if scale == 1.0:
        return pixel_values, pixel_mask, sizes
    scaled = pixel_values.new_zeros((len(sizes), pixel_values.shape[1], height, width))
    for index, ((h, w), (new_h, new_w)) in enumerate(zip(valid_sizes, sizes, strict=True)):
        # A placeholder without a valid pixel still gets a (meaningless) input of the smallest size.
        source = pixel_values[index: index + 1, :, : max(h, 1), : max(w, 1)]
        scaled[index, :, :new_h, :new_w] = torch.nn.functional.interpolate(
            source, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return scaled, pixel_mask, sizes


def strip_starts(width: int, strip_width: int) -> list[int]:
    """Left edges of the fewest strips of ``strip_width`` covering ``width``, spread evenly, multiples of 32.

    Strips overlap by what is left over, shared out between the seams; the last one ends at ``width``.
    """
    if strip_width >= width:
        return [0]
    count = math.ceil(width / strip_width)
    last = width - strip_width
    starts = [min(last, round(last * index / (count - 1) / SIZE_DIVISOR) * SIZE_DIVISOR) for index in range(count)]
    return sorted(set(starts[:-1]) | {last})


def strip_width_for(height: int, width: int, tile_pixels: int) -> int:
    """The widest multiple of 32 (32 to ``width``) whose full-height strip has at most ``tile_pixels`` pixels."""
    return min(width, max(SIZE_DIVISOR, tile_pixels // max(height, 1) // SIZE_DIVISOR * SIZE_DIVISOR))


def class_scores_in_strips(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    strip_width: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Class scores (B, C, h, w) at the model's mask resolution, stitched from full-height strips of the input.

    Each strip runs alone; its class probabilities weight the sigmoids of its mask logits (upstream's rule, at the
    strip's own mask resolution), and columns where strips overlap take their mean. Only one strip's outputs and
    the stitched scores are held at a time.
    """
    height, width = pixel_values.shape[-2:]
    stitched, counts, scale = None, None, None
    for start in strip_starts(width, strip_width):
        with autocast():
            outputs = model(pixel_values=pixel_values[..., start: start + strip_width],
                            pixel_mask=pixel_mask[..., start: start + strip_width])
        class_probs = outputs.class_queries_logits.float().softmax(dim=-1)[..., :-1]
        mask_probs = outputs.masks_queries_logits.float().sigmoid()
        del outputs
        scores = torch.einsum("bqc,bqhw->bchw", class_probs, mask_probs)
        if stitched is None:
            # The mask resolution is a fixed fraction of the input (1/4 for Mask2Former), the same for every strip.
            scale = scores.shape[-1] / strip_width
            stitched = scores.new_zeros((*scores.shape[:2], scores.shape[-2], round(width * scale)))
            counts = scores.new_zeros(stitched.shape[-1])
        left = round(start * scale)
        stitched[..., left: left + scores.shape[-1]] += scores
        counts[left: left + scores.shape[-1]] += 1
    return stitched / counts


def add_view_scores(
    total: torch.Tensor | None,
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    valid_sizes: Sequence[tuple[int, int]],
    mirrored: bool = False,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    tile_pixels: int | None = None,
) -> torch.Tensor:
    """``total`` (B, C, 384, 384) plus the class scores of one view of a batch (a new tensor when ``total`` is None).

    ``pixel_values`` is the view as fed to the model; ``mirrored`` says it is the horizontal mirror of the images
    padded at the bottom and right. A view of more than ``tile_pixels`` pixels runs in strips
    (:func:`class_scores_in_strips`), whose stitched class scores are cropped to each image and resized to 384x384.
    The model's outputs (hidden states included) are freed on return.
    """
    height, width = pixel_values.shape[-2:]
    if tile_pixels is not None and height * width > tile_pixels:
        scores = class_scores_in_strips(model, pixel_values, pixel_mask, strip_width_for(height, width, tile_pixels),
                                        autocast)
        if mirrored:
            scores = scores.flip(-1)
        if total is None:
            total = scores.new_zeros((len(valid_sizes), scores.shape[1], *UPSTREAM_MASK_SIZE))
        for index, (valid_h, valid_w) in enumerate(valid_sizes):
            crop_h = max(1, round(valid_h * scores.shape[-2] / height))
            crop_w = max(1, round(valid_w * scores.shape[-1] / width))
            total[index] += torch.nn.functional.interpolate(
                scores[index: index + 1, :, :crop_h, :crop_w], size=UPSTREAM_MASK_SIZE, mode="bilinear",
                align_corners=False,
            )[0]
        return total
    with autocast():
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    class_logits = outputs.class_queries_logits.float()
    mask_logits = outputs.masks_queries_logits.float()
    if mirrored:
        # Mirroring the mirrored masks back puts the padding on the right again, where the crop expects it.
        mask_logits = mask_logits.flip(-1)
    if total is None:
        total = mask_logits.new_zeros((len(valid_sizes), class_logits.shape[-1] - 1, *UPSTREAM_MASK_SIZE))
    input_size = (height, width)
    for index, valid_size in enumerate(valid_sizes):
        total[index] += semantic_scores_for_image(class_logits[index], mask_logits[index], valid_size, input_size)
    return total


def multiscale_label_maps(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    valid_sizes: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
    scales: Sequence[float],
    flip: bool = False,
    working_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    tile: bool = True,
) -> list[torch.Tensor]:
    """Label maps from the class scores of every scale (and its mirror with ``flip``) averaged at 384x384.

    Upstream's rule resizes each view's mask logits to the fixed 384x384 grid, whatever the input size, and the
    final resize to the target is bilinear, hence linear: resizing the sum of the views' 384x384 scores once gives
    the sum of resizing each (to float rounding), so the views are added on the small grid and resized once. Views
    run one at a time, each one's outputs freed before the next forward pass. The sum is divided by the number of
    views, an average as the papers define it: dividing by a positive count leaves the argmax of the sum (to float
    rounding; exactly when the count is a power of 2, so one view is bitwise the single-scale path).

    With ``tile`` a view with more pixels than the single-scale input runs in full-height strips of at most that
    many pixels: no forward pass is larger than the single-scale one, so neither is the peak memory much larger.
    Each strip sees the whole height of the scene (sky to road) but only part of its width.
    """
    tile_pixels = pixel_values.shape[-2] * pixel_values.shape[-1] if tile else None
    total, views = None, 0
    for scale in scales:
        scaled, scaled_mask, sizes = scale_batch(pixel_values, valid_sizes, scale)
        total = add_view_scores(total, model, scaled, scaled_mask, sizes, autocast=autocast, tile_pixels=tile_pixels)
        views += 1
        if flip:
            # The mirror replaces the scaled batch rather than joining it: one copy of the input lives during the
            # forward pass, and the largest scale's activations are those of B images, not 2B.
            scaled, scaled_mask = scaled.flip(-1), scaled_mask.flip(-1)
            total = add_view_scores(total, model, scaled, scaled_mask, sizes, mirrored=True, autocast=autocast,
                                    tile_pixels=tile_pixels)
            views += 1
    total /= views
    map_dtype = label_map_dtype(total.shape[1])
    return [finish_label_map(total[index], tuple(target_size), working_size, map_dtype)
            for index, target_size in enumerate(target_sizes)]


def predict_batch(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    accelerator: Accelerator,
    tta: str = "none",
    working_size: int | None = None,
    scales: Sequence[float] | None = None,
    tile: bool = True,
) -> list[torch.Tensor]:
    """Label maps on the accelerator's device, one per image at the size of its ``original_segmentation_maps``.

    ``tta="flip"`` also runs the horizontal mirror of every image and sums the class scores of both. With
    ``scales`` every image is also run at each scale, one view at a time, scales above 1 in strips unless ``tile``
    is False (see :func:`multiscale_label_maps`).
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    device = accelerator.device
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    valid_sizes = valid_sizes_of(batch["pixel_mask"])
    target_sizes = [tuple(np.shape(label)[:2]) for label in batch["original_segmentation_maps"]]
    if scales is not None:
        return multiscale_label_maps(model, pixel_values, valid_sizes, target_sizes, parse_tta_scales(scales),
                                     flip=tta == "flip", working_size=working_size, autocast=accelerator.autocast,
                                     tile=tile)
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
    if tta == "flip":
        pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        pixel_mask = torch.cat([pixel_mask, pixel_mask.flip(-1)])
    with accelerator.autocast():
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return semantic_maps_from_outputs(
        outputs.class_queries_logits.float(),
        outputs.masks_queries_logits.float(),
        target_sizes=target_sizes,
        valid_sizes=valid_sizes,
        input_size=tuple(pixel_values.shape[-2:]),
        working_size=working_size,
        mirrored=tta == "flip",
    )
