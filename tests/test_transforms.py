"""Tests for the train/eval pipelines and the dataset transform in roadseg_utils.transforms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from roadseg_utils.modeling import load_image_processor
from roadseg_utils.transforms import build_train_transforms, make_eval_transform, make_transform_fn

IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_TO_RED = 9  # label id * 9 stays below 255 for ids 0..25 and keeps neighbouring ids far apart in colour


def block_scene(height: int, width: int, block: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """Blocky label map with a few 255 blocks, and an image whose red channel encodes the label id."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 26, size=(-(-height // block), -(-width // block))).astype(np.uint8)
    grid[rng.random(grid.shape) < 0.1] = 255
    label = np.kron(grid, np.ones((block, block), dtype=np.uint8))[:height, :width]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.where(label == 255, 250, label.astype(np.int64) * LABEL_TO_RED)
    image[..., 1] = (np.arange(width) * 255 // max(width - 1, 1))[None, :]
    image[..., 2] = (np.arange(height) * 255 // max(height - 1, 1))[:, None]
    return Image.fromarray(image), label


def block_interior(label: np.ndarray, margin: int) -> np.ndarray:
    """Pixels whose label equals that of every pixel within ``margin`` rows and columns."""
    padded = np.pad(label.astype(np.int64), margin, constant_values=-1)
    height, width = label.shape
    interior = np.ones(label.shape, dtype=bool)
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            interior &= padded[margin + dy : margin + dy + height, margin + dx : margin + dx + width] == label
    return interior


def geometry_only(crop_size: tuple[int, int], scale_range: tuple[float, float], hflip_prob: float = 0.5):
    """Train pipeline without colour jitter and with identity normalisation, so pixels can be read back."""
    return build_train_transforms(
        crop_size, IDENTITY_MEAN, IDENTITY_STD, scale_range=scale_range, hflip_prob=hflip_prob, color_jitter_prob=0.0
    )


def run(transform_fn, image: Image.Image, label: np.ndarray, path: str = "scene.png") -> dict:
    """Apply a dataset transform to one row and return the single transformed example."""
    batch = transform_fn({"image": [image], "label": [label], "path": [path], "sequence": ["seq"]})
    return {key: values[0] for key, values in batch.items()}


def image_back(pixel_values: np.ndarray) -> np.ndarray:
    """Undo identity normalisation: CHW floats in 0..1 back to HWC 0..255."""
    return np.rint(pixel_values.transpose(1, 2, 0) * 255.0).astype(np.int64)


def test_flip_moves_label_with_image_exactly():
    image, label = block_scene(48, 64, block=8, seed=0)
    np.random.seed(0)
    out = run(make_transform_fn(geometry_only((48, 64), (1.0, 1.0), hflip_prob=1.0)), image, label)
    np.testing.assert_array_equal(out["label"], label[:, ::-1])
    np.testing.assert_array_equal(image_back(out["pixel_values"]), np.asarray(image)[:, ::-1].astype(np.int64))
    assert out["valid"].all()


def test_scale_crop_keeps_label_values_and_alignment():
    image, label = block_scene(90, 160, block=15, seed=1)
    transform_fn = make_transform_fn(geometry_only((64, 96), (0.6, 1.8)))
    np.random.seed(1)
    for _ in range(6):
        out = run(transform_fn, image, label)
        assert out["label"].shape == (64, 96)
        # Nearest neighbour: no value that was not in the input (or the padding label) appears.
        assert set(np.unique(out["label"])) <= set(np.unique(label)) | {255}
        decoded = np.rint(image_back(out["pixel_values"])[..., 0] / LABEL_TO_RED)
        # Linear resizing blurs the image at block borders, so compare pixels 2 or more away from any border.
        interior = block_interior(out["label"], margin=2) & (out["valid"] == 1) & (out["label"] != 255)
        assert interior.sum() > 500
        assert (decoded[interior] == out["label"][interior]).mean() > 0.99


def test_padding_is_ignored_and_marked_invalid_when_image_is_smaller_than_crop():
    image, label = block_scene(20, 30, block=5, seed=2)
    label[:5, :5] = 255  # real pixels with label 255: still valid, unlike padding
    transform_fn = make_transform_fn(
        build_train_transforms((64, 64), IMAGENET_MEAN, IMAGENET_STD, scale_range=(0.5, 0.5), color_jitter_prob=0.0)
    )
    np.random.seed(2)
    out = run(transform_fn, image, label)
    # Cover scale is max(64/20, 64/30) = 3.2, halved: the image becomes 32x48 inside a 64x64 crop.
    assert out["pixel_values"].shape == (3, 64, 64)
    assert int(out["valid"].sum()) == 32 * 48
    rows, cols = np.nonzero(out["valid"])
    assert rows.max() - rows.min() + 1 == 32 and cols.max() - cols.min() + 1 == 48
    padding = out["valid"] == 0
    assert (out["label"][padding] == 255).all()
    assert ((out["label"] == 255) & ~padding).any()
    # Padding carries the mean colour: 0 after normalisation, up to the rounding of the mean to a uint8 colour.
    bound = 0.5 / 255.0 / min(IMAGENET_STD) + 1e-6
    assert np.abs(out["pixel_values"][:, padding]).max() <= bound


@pytest.mark.parametrize("size", [(40, 50), (200, 120), (64, 96), (30, 300)])
def test_train_output_shape_equals_crop_size(size):
    image, label = block_scene(*size, block=10, seed=3)
    np.random.seed(3)
    out = run(make_transform_fn(build_train_transforms((64, 96), IMAGENET_MEAN, IMAGENET_STD)), image, label)
    assert out["pixel_values"].shape == (3, 64, 96) and out["pixel_values"].dtype == np.float32
    assert out["label"].shape == out["valid"].shape == (64, 96)
    assert out["label"].dtype == out["valid"].dtype == np.uint8


def test_normalisation_uses_given_mean_and_std():
    colour = np.array([200, 100, 30], dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(colour, (16, 24, 3)).copy())
    label = np.zeros((16, 24), dtype=np.uint8)
    expected = (colour / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    processor = load_image_processor("tiny", do_resize=False, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    for transform_fn in (
        make_eval_transform(processor),
        make_transform_fn(build_train_transforms((16, 24), IMAGENET_MEAN, IMAGENET_STD, scale_range=(1.0, 1.0),
                                                 color_jitter_prob=0.0)),
    ):
        out = run(transform_fn, image, label)
        expected_map = np.broadcast_to(expected[:, None, None], (3, 16, 24))
        np.testing.assert_allclose(out["pixel_values"], expected_map, atol=1e-5)


def test_eval_transform_is_the_image_processor_and_keeps_originals():
    image, label = block_scene(60, 100, block=5, seed=4)
    label_before = label.copy()
    processor = load_image_processor("tiny", shortest_edge=40)
    out = run(make_eval_transform(processor), image, label)
    # The processor's rule: shortest edge 40 (40x67), each side rounded up to its size divisor 32: 64x96.
    expected = processor(images=np.asarray(image), return_tensors="np")["pixel_values"][0]
    assert out["pixel_values"].shape == expected.shape == (3, 64, 96)
    np.testing.assert_array_equal(out["pixel_values"], expected)
    assert out["label"].shape == out["valid"].shape == (64, 96)
    assert out["valid"].all()
    assert set(np.unique(out["label"])) <= set(np.unique(label))
    np.testing.assert_array_equal(out["original_label"], label_before)
    np.testing.assert_array_equal(label, label_before)
    np.testing.assert_array_equal(out["original_image"], np.asarray(image))
    assert out["original_image"].dtype == np.uint8 and out["path"] == "scene.png" and out["sequence"] == "seq"


def test_eval_transform_without_resize_keeps_size():
    image, label = block_scene(37, 53, block=4, seed=5)
    out = run(make_eval_transform(load_image_processor("tiny", do_resize=False)), image, label)
    np.testing.assert_array_equal(out["label"], label)
    assert out["pixel_values"].shape == (3, 37, 53)


def test_augmentation_follows_numpy_seed_and_differs_between_worker_copies():
    image, label = block_scene(90, 160, block=15, seed=6)
    transform_fn = make_transform_fn(build_train_transforms((64, 96), IMAGENET_MEAN, IMAGENET_STD))
    worker_copy = copy.deepcopy(transform_fn)  # what a forked DataLoader worker holds

    def draw(fn, seed):
        np.random.seed(seed)
        return run(fn, image, label)["pixel_values"]

    np.testing.assert_array_equal(draw(transform_fn, 7), draw(worker_copy, 7))
    assert not np.array_equal(draw(transform_fn, 7), draw(worker_copy, 8))


def test_keep_originals_false_drops_them():
    image, label = block_scene(32, 32, block=8, seed=7)
    transform_fn = make_eval_transform(load_image_processor("tiny", do_resize=False), keep_originals=False)
    out = run(transform_fn, image, label)
    assert "original_image" not in out and "original_label" not in out


def test_works_as_datasets_with_transform():
    datasets = pytest.importorskip("datasets")
    scenes = [block_scene(40, 60, block=10, seed=seed) for seed in (9, 10)]
    dataset = datasets.Dataset.from_dict(
        {
            "image": [image for image, _ in scenes],
            "label": [label for _, label in scenes],
            "path": ["a.png", "b.png"],
            "sequence": ["s", "s"],
        }
    ).with_transform(make_transform_fn(build_train_transforms((32, 32), IMAGENET_MEAN, IMAGENET_STD)))
    example = dataset[1]
    assert example["pixel_values"].shape == (3, 32, 32) and example["label"].shape == (32, 32)
    np.testing.assert_array_equal(example["original_label"], scenes[1][1])
    assert example["path"] == "b.png" and example["sequence"] == "s"


def test_bad_inputs_raise_clear_errors():
    image, label = block_scene(32, 32, block=8, seed=8)
    transform_fn = make_eval_transform(load_image_processor("tiny", do_resize=False))
    with pytest.raises(ValueError, match="broken.png.*differs from image size"):
        run(transform_fn, image, label[:16], path="broken.png")
    with pytest.raises(ValueError, match="rgb_label.png.*2-D"):
        run(transform_fn, image, np.dstack([label] * 3), path="rgb_label.png")
    with pytest.raises(ValueError, match="0..255"):
        run(transform_fn, image, label.astype(np.int32) + 300)
    with pytest.raises(ValueError, match="0-1 scale"):
        build_train_transforms((16, 16), (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
