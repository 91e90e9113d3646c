"""The training augmentations (albumentations), the evaluation inputs (the image processor), and the transforms
that apply them to dataset rows.

Every pipeline moves two maps with the image, stacked as the two channels of one uint8 mask: the label map
(padding filled with 255 = ignore) and a validity map (1 = real pixel, padding filled with 0). Padding is
therefore known exactly even where the label itself is 255, and the collator turns the validity map into
``pixel_mask``. Geometry moves both with nearest-neighbour interpolation, so no new label values appear.

Determinism. Albumentations 2 draws from generators owned by each ``Compose`` and ignores the global seeds;
a ``Compose`` copied into several ``DataLoader`` workers would replay the same augmentations in each of them.
``SegmentationTransform`` therefore reseeds its pipeline before every example from NumPy's global generator.
That generator is seeded by ``set_seed(args.seed)`` in the ``Trainer``'s main process, and in each loader worker
by PyTorch (from the loader's base seed, itself drawn from the seeded torch generator) and again by the
``Trainer``'s ``seed_worker``. A run is thus reproducible for a given seed, number of workers and process rank,
and workers never share an augmentation stream. The ``seed`` of ``build_train_transforms`` only matters when the
pipeline is called directly, outside ``SegmentationTransform``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from .labels import IGNORE_INDEX

PADDING_LABEL = IGNORE_INDEX
PADDING_VALID = 0
MAX_PIXEL_VALUE = 255.0


class ScaleJitter(A.SmallestMaxSize):
    """Rescale the image so it just covers ``crop_size``, times a factor drawn uniformly from ``scale_range``.

    Factor 1 makes the crop span the whole image along its tighter side; below 1 the image becomes smaller
    than the crop and the crop pads it; above 1 the crop sees a zoomed-in part. One resize, aspect kept.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        super().__init__(
            max_size_hw=tuple(crop_size), interpolation=interpolation, mask_interpolation=cv2.INTER_NEAREST, p=p
        )
        self.scale_range = (float(low), float(high))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Scale that covers the crop, jittered by a random factor from the pipeline's own generator."""
        cover_scale = super().get_params_dependent_on_data(params, data)["scale"]
        return {"scale": cover_scale * self.py_random.uniform(*self.scale_range)}


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
    if min(std) <= 0:
        raise ValueError(f"std values must be positive, got {std}")
    if max(abs(v) for v in mean + std) > 1.0:
        raise ValueError(
            f"mean and std are expected on the 0-1 scale of image_processor.image_mean/image_std, got mean={mean} "
            f"std={std}"
        )
    return mean, std


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> A.Normalize:
    # Albumentations scales 0-1 statistics by max_pixel_value, which matches rescale(1/255) + normalize upstream.
    return A.Normalize(mean=mean, std=std, max_pixel_value=MAX_PIXEL_VALUE, p=1.0)


def build_train_transforms(
    crop_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip_prob: float = 0.5,
    color_jitter: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.05),
    color_jitter_prob: float = 0.8,
    seed: int | None = None,
) -> A.Compose:
    """Colour jitter, scale jitter, random crop (padded when the image is smaller), flip and normalisation."""
    crop_height, crop_width = (int(v) for v in crop_size)
    if crop_height < 1 or crop_width < 1:
        raise ValueError(f"crop_size must be positive (height, width), got {crop_size}")
    mean, std = _check_mean_std(mean, std)
    # Padded image pixels get the mean colour, i.e. 0 after normalisation: the same value the collator uses when
    # it pads evaluation batches, and the value upstream image processors pad with.
    mean_colour = tuple(round(v * MAX_PIXEL_VALUE) for v in mean)
    brightness, contrast, saturation, hue = color_jitter
    return A.Compose(
        [
            # Colour jitter comes first so that it never touches the padding added by the crop.
            A.ColorJitter(
                brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=color_jitter_prob
            ),
            ScaleJitter((crop_height, crop_width), scale_range),
            A.RandomCrop(
                height=crop_height,
                width=crop_width,
                pad_if_needed=True,
                pad_position="random",
                border_mode=cv2.BORDER_CONSTANT,
                fill=mean_colour,
                fill_mask=(PADDING_LABEL, PADDING_VALID),
            ),
            A.HorizontalFlip(p=hflip_prob),
            _normalize(mean, std),
        ],
        seed=seed,
    )


def _as_label_map(label: Any, image_shape: tuple[int, ...], source: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{source}: label must be a 2-D map of label ids, got shape {label.shape}")
    if label.shape != image_shape[:2]:
        raise ValueError(f"{source}: label size {label.shape} differs from image size {image_shape[:2]}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"{source}: label ids must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    return label


class ExampleTransform:
    """Batch transform for ``datasets.Dataset.with_transform``: image + label rows to model-ready examples.

    Output per example: ``pixel_values`` (float32, 3xHxW), ``label`` (uint8 HxW, 255 = ignore or padding),
    ``valid`` (uint8 HxW, 1 = real pixel), and unless ``keep_originals`` is False ``original_image`` (uint8 HxWx3)
    and ``original_label`` (the untouched map). Other columns (``path``, ``sequence`` ...) pass through.
    Subclasses say how one image and its label map are prepared (`prepare`).
    """

    keep_originals: bool

    def prepare(self, rgb: np.ndarray, label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``pixel_values`` (3xHxW), label and validity map of one example."""
        raise NotImplementedError

    def __call__(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Transform a batch of dataset rows (a dict of columns)."""
        for column in ("image", "label"):
            if column not in examples:
                raise KeyError(f"dataset rows need a {column!r} column, got columns {sorted(examples)}")
        num_examples = len(examples["image"])
        sources = examples.get("path") or [f"example {i}" for i in range(num_examples)]
        outputs: dict[str, list[Any]] = {k: v for k, v in examples.items() if k not in ("image", "label")}
        new_columns = ["pixel_values", "label", "valid"]
        if self.keep_originals:
            new_columns += ["original_image", "original_label"]
        outputs.update({column: [] for column in new_columns})
        for image, label, source in zip(examples["image"], examples["label"], sources, strict=True):
            rgb = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image, dtype=np.uint8)
            if rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"{source}: image must be RGB (HxWx3), got shape {rgb.shape}")
            label_map = _as_label_map(label, rgb.shape, str(source))
            pixel_values, prepared_label, valid = self.prepare(rgb, label_map)
            outputs["pixel_values"].append(pixel_values)
            outputs["label"].append(prepared_label)
            outputs["valid"].append(valid)
            if self.keep_originals:
                outputs["original_image"].append(rgb)
                outputs["original_label"].append(label_map)
        return outputs


@dataclass
class SegmentationTransform(ExampleTransform):
    """An albumentations pipeline applied to each example, reseeded per example (see the module docstring)."""

    transforms: A.Compose
    keep_originals: bool = True

    def prepare(self, rgb: np.ndarray, label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pipeline applied to the image and the stacked label and validity maps."""
        stacked = np.dstack([label_map, np.ones_like(label_map)])
        self.transforms.set_random_seed(int(np.random.randint(0, 2**31 - 1)))
        transformed = self.transforms(image=rgb, mask=stacked)
        return (
            np.ascontiguousarray(transformed["image"].transpose(2, 0, 1)),
            np.ascontiguousarray(transformed["mask"][..., 0]),
            np.ascontiguousarray(transformed["mask"][..., 1]),
        )


@dataclass
class ProcessorTransform(ExampleTransform):
    """Evaluation inputs made by the image processor itself, so every scoring path sees what ``pipeline()`` sees.

    The processor resizes (its shortest edge, each side rounded up to its ``size_divisor``) and normalises; the
    label map follows with nearest neighbours, as the processor resizes segmentation maps. Scores are taken on the
    original label maps, so the label at the input size serves only the evaluation loss.
    """

    image_processor: Any
    keep_originals: bool = True

    def prepare(self, rgb: np.ndarray, label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The processor's ``pixel_values`` of the image, and the label map resized to match."""
        pixel_values = self.image_processor(images=rgb, return_tensors="np")["pixel_values"][0].astype(np.float32)
        height, width = pixel_values.shape[1:]
        if (height, width) != label_map.shape:
            label_map = np.asarray(Image.fromarray(label_map).resize((width, height), Image.NEAREST))
        return np.ascontiguousarray(pixel_values), label_map, np.ones((height, width), dtype=np.uint8)


def make_transform_fn(transforms: A.Compose, keep_originals: bool = True) -> SegmentationTransform:
    """Wrap a pipeline for ``Dataset.with_transform``/``set_transform`` (picklable, so spawned workers work)."""
    return SegmentationTransform(transforms=transforms, keep_originals=keep_originals)


def make_eval_transform(image_processor: Any, keep_originals: bool = True) -> ProcessorTransform:
    """The evaluation transform of every scoring path: the image processor's own resizing and normalisation."""
    return ProcessorTransform(image_processor=image_processor, keep_originals=keep_originals)
