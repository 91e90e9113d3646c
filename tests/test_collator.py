"""Tests for the six-key SegmentationCollator, against the upstream image processor and a tiny Mask2Former."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

from roadseg_utils.collator import BATCH_KEYS, MODEL_INPUT_KEYS, SegmentationCollator, present_classes
from roadseg_utils.labels import idd_label_set
from roadseg_utils.modeling import build_tiny_config
from roadseg_utils.transforms import build_train_transforms, make_transform_fn

NUM_LABELS = 26
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_label(height: int, width: int, rng: np.random.Generator, ignore_share: float = 0.2) -> np.ndarray:
    """Blocky random label map over a random subset of classes, with some 255 pixels."""
    classes = rng.choice(NUM_LABELS, size=int(rng.integers(1, 12)), replace=False)
    coarse = rng.choice(classes, size=(max(height // 4, 1), max(width // 4, 1))).astype(np.uint8)
    label = np.kron(coarse, np.ones((4, 4), dtype=np.uint8))
    label = np.pad(label, ((0, max(height - label.shape[0], 0)), (0, max(width - label.shape[1], 0))), mode="edge")
    label = label[:height, :width].copy()
    label[rng.random((height, width)) < ignore_share] = 255
    return label


def make_example(label: np.ndarray, rng: np.random.Generator, valid: np.ndarray | None = None, path: str = "x"):
    """An example shaped like SegmentationTransform's output."""
    height, width = label.shape
    example = {
        "pixel_values": rng.standard_normal((3, height, width)).astype(np.float32),
        "label": label,
        "valid": np.ones((height, width), dtype=np.uint8) if valid is None else valid,
        "original_image": rng.integers(0, 256, (height + 7, width + 5, 3), dtype=np.uint8),
        "original_label": label.copy(),
        "path": path,
    }
    return example


@pytest.fixture(scope="module")
def processor():
    return Mask2FormerImageProcessorPil(ignore_index=255, do_reduce_labels=False)


def process(processor, examples):
    """Upstream encoding of already-normalised images and their label maps."""
    return processor(
        images=[example["pixel_values"] for example in examples],
        segmentation_maps=[example["label"] for example in examples],
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
        input_data_format="channels_first",
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def tiny_model(one_torch_thread):
    torch.manual_seed(0)
    config = build_tiny_config(idd_label_set(3))
    assert config.num_labels == NUM_LABELS
    return Mask2FormerForUniversalSegmentation(config).train()


def forward_backward(model, batch) -> torch.Tensor:
    """What the trainer does: model inputs only, masks cast to the model's float dtype."""
    model.zero_grad()
    torch.manual_seed(0)
    outputs = model(
        pixel_values=batch["pixel_values"],
        pixel_mask=batch["pixel_mask"],
        mask_labels=[masks.to(torch.float32) for masks in batch["mask_labels"]],
        class_labels=batch["class_labels"],
    )
    outputs.loss.backward()
    return outputs.loss


def test_six_keys_types_and_shapes():
    rng = np.random.default_rng(0)
    labels = [random_label(32, 48, rng) for _ in range(3)] + [np.full((32, 48), 255, dtype=np.uint8)]
    examples = [make_example(label, rng) for label in labels]
    batch = SegmentationCollator()(examples)
    assert tuple(batch) == BATCH_KEYS
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (4, 3, 32, 48)
    assert batch["pixel_mask"].dtype == torch.int64 and batch["pixel_mask"].shape == (4, 32, 48)
    assert batch["pixel_mask"].eq(1).all()
    torch.testing.assert_close(batch["pixel_values"], torch.from_numpy(np.stack([e["pixel_values"] for e in examples])))
    for masks, classes, label in zip(batch["mask_labels"], batch["class_labels"], labels, strict=True):
        expected = np.setdiff1d(np.unique(label), [255])
        assert masks.dtype == torch.bool and masks.shape == (len(expected), 32, 48)
        assert classes.dtype == torch.int64 and classes.tolist() == expected.tolist()
        # Every labelled pixel lies in exactly one mask; ignored pixels lie in none.
        np.testing.assert_array_equal(masks.sum(0).numpy(), (label != 255).astype(np.int64))
    assert batch["mask_labels"][3].shape == (0, 32, 48) and batch["class_labels"][3].shape == (0,)
    assert len(batch["original_images"]) == len(batch["original_segmentation_maps"]) == 4
    for example, image, seg_map in zip(
        examples, batch["original_images"], batch["original_segmentation_maps"], strict=True
    ):
        assert image.dtype == np.uint8 and image.shape == example["original_image"].shape
        np.testing.assert_array_equal(seg_map, example["original_label"])


def test_masks_and_classes_match_image_processor(processor):
    rng = np.random.default_rng(1)
    labels = [random_label(40, 56, rng, ignore_share=share) for share in (0.0, 0.3, 0.9)]
    labels.append(np.full((40, 56), 255, dtype=np.uint8))
    examples = [make_example(label, rng) for label in labels]
    batch = SegmentationCollator()(examples)
    encoded = process(processor, examples)
    for ours, theirs in zip(batch["mask_labels"], encoded["mask_labels"], strict=True):
        torch.testing.assert_close(ours.to(torch.float32), theirs, rtol=0, atol=0)
    for ours, theirs in zip(batch["class_labels"], encoded["class_labels"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(batch["pixel_values"], encoded["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(batch["pixel_mask"], encoded["pixel_mask"], rtol=0, atol=0)


def test_eval_batch_of_different_sizes_is_padded(processor):
    rng = np.random.default_rng(2)
    labels = [random_label(30, 44, rng), random_label(36, 28, rng), random_label(24, 24, rng)]
    examples = [make_example(label, rng) for label in labels]
    batch = SegmentationCollator()(examples)
    encoded = process(processor, examples)
    assert batch["pixel_values"].shape == (3, 3, 36, 44)
    torch.testing.assert_close(batch["pixel_mask"], encoded["pixel_mask"], rtol=0, atol=0)
    torch.testing.assert_close(batch["pixel_values"], encoded["pixel_values"], rtol=0, atol=0)
    for label, masks, theirs, pixel_mask in zip(
        labels, batch["mask_labels"], encoded["mask_labels"], batch["pixel_mask"], strict=True
    ):
        height, width = label.shape
        assert pixel_mask[:height, :width].eq(1).all() and int(pixel_mask.sum()) == height * width
        # Upstream pads its float masks with ignore_index (255.0); ours stay binary: padding is in no mask.
        torch.testing.assert_close(masks[:, :height, :width].to(torch.float32), theirs[:, :height, :width])
        assert not masks[:, pixel_mask == 0].any()


def test_without_targets_keeps_inputs_and_originals():
    rng = np.random.default_rng(1)
    examples = [make_example(random_label(32, 48, rng), rng) for _ in range(2)]
    full = SegmentationCollator()(examples)
    inference = SegmentationCollator(with_targets=False)(examples)
    assert tuple(inference) == BATCH_KEYS
    assert inference["mask_labels"] == [] and inference["class_labels"] == []
    for key in ("pixel_values", "pixel_mask"):
        assert torch.equal(inference[key], full[key])
    for a, b in zip(inference["original_segmentation_maps"], full["original_segmentation_maps"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_pixel_mask_comes_from_valid_map():
    rng = np.random.default_rng(3)
    label = random_label(32, 32, rng, ignore_share=0.0)
    valid = np.zeros((32, 32), dtype=np.uint8)
    valid[4:20, 2:30] = 1
    label[valid == 0] = 255
    batch = SegmentationCollator()([make_example(label, rng, valid=valid)])
    np.testing.assert_array_equal(batch["pixel_mask"][0].numpy(), valid)
    assert not batch["mask_labels"][0][:, valid == 0].any()


def test_uint8_mask_dtype_and_bad_settings():
    rng = np.random.default_rng(4)
    examples = [make_example(random_label(16, 16, rng), rng)]
    as_bool = SegmentationCollator()(examples)["mask_labels"][0]
    as_uint8 = SegmentationCollator(mask_dtype=torch.uint8)(examples)["mask_labels"][0]
    assert as_uint8.dtype == torch.uint8
    torch.testing.assert_close(as_uint8, as_bool.to(torch.uint8), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask_dtype"):
        SegmentationCollator(mask_dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        SegmentationCollator()([])


def test_label_ids_beyond_num_labels_name_the_example():
    rng = np.random.default_rng(5)
    label = random_label(16, 16, rng)
    label[0, 0] = 30
    with pytest.raises(ValueError, match=r"frame_7.png.*\[30\]"):
        SegmentationCollator(num_labels=NUM_LABELS)([make_example(label, rng, path="frame_7.png")])


def test_present_classes_excludes_ignore():
    label = np.array([[0, 3, 255], [3, 7, 255]], dtype=np.uint8)
    assert present_classes(label).tolist() == [0, 3, 7]
    assert present_classes(label, ignore_index=3).tolist() == [0, 7, 255]


@pytest.mark.parametrize("unlabelled", [[3], [0, 1, 2, 3]], ids=["one-unlabelled-crop", "all-unlabelled"])
def test_forward_backward_with_unlabelled_crop_gives_finite_loss(tiny_model, unlabelled):
    rng = np.random.default_rng(6)
    labels = [random_label(64, 64, rng) for _ in range(4)]
    for i in unlabelled:
        labels[i] = np.full((64, 64), 255, dtype=np.uint8)
    batch = SegmentationCollator(num_labels=NUM_LABELS)([make_example(label, rng) for label in labels])
    assert batch["mask_labels"][3].shape[0] == 0
    loss = forward_backward(tiny_model, {key: batch[key] for key in MODEL_INPUT_KEYS})
    assert torch.isfinite(loss)
    gradient = tiny_model.class_predictor.weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_transformed_rows_train_the_tiny_model(tiny_model):
    rng = np.random.default_rng(7)
    rows = {"image": [], "label": [], "path": [], "sequence": []}
    for i, (height, width) in enumerate([(96, 128), (40, 50), (80, 120)]):
        rows["image"].append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
        label = random_label(height, width, rng)
        if i == 2:
            label[:] = 255
        rows["label"].append(label)
        rows["path"].append(f"seq/frame_{i}.png")
        rows["sequence"].append("seq")
    transform_fn = make_transform_fn(
        build_train_transforms((64, 64), IMAGENET_MEAN, IMAGENET_STD, scale_range=(0.5, 1.0)), keep_originals=False
    )
    np.random.seed(7)
    transformed = transform_fn(rows)
    examples = [{key: values[i] for key, values in transformed.items()} for i in range(3)]
    batch = SegmentationCollator(num_labels=NUM_LABELS)(examples)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["original_images"] == [] and batch["original_segmentation_maps"] == []
    for i, example in enumerate(examples):
        np.testing.assert_array_equal(batch["pixel_mask"][i].numpy(), example["valid"])
    assert batch["mask_labels"][2].shape == (0, 64, 64)
    loss = forward_backward(tiny_model, {key: batch[key] for key in MODEL_INPUT_KEYS})
    assert torch.isfinite(loss)


def expected_batch(examples):
    """What the collator must return for equally sized examples, built independently of its buffers."""
    masks = [np.stack([ex["label"] == c for c in np.unique(ex["label"][ex["label"] != 255])]) for ex in examples]
    return np.stack([ex["pixel_values"] for ex in examples]), masks


def assert_batch_equals(batch, examples):
    pixel_values, masks = expected_batch(examples)
    np.testing.assert_array_equal(batch["pixel_values"].numpy(), pixel_values)
    assert batch["pixel_mask"].dtype == torch.int64 and bool((batch["pixel_mask"] == 1).all())
    for ours, theirs in zip(batch["mask_labels"], masks, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs)


def test_batches_reuse_freed_memory_and_never_memory_still_in_use():
    from roadseg_utils.collator import host_buffer_pool

    rng = np.random.default_rng(8)
    collator = SegmentationCollator(num_labels=NUM_LABELS)
    groups = [[make_example(random_label(48, 64, rng, 0.1), rng) for _ in range(3)] for _ in range(4)]

    first = collator(groups[0])
    address = first["pixel_values"].data_ptr()
    del first
    second = collator(groups[1])
    assert second["pixel_values"].data_ptr() == address, "a freed batch's block was not reused"

    # While any view of a batch lives, even one mask slice, its block is not handed out again.
    kept_slice = second["mask_labels"][1][0]
    kept_values = kept_slice.clone()
    del second
    later = [collator(group) for group in groups[2:]] + [collator(groups[0])]
    assert all(batch["pixel_values"].data_ptr() != address for batch in later)
    assert torch.equal(kept_slice, kept_values)
    for batch, group in zip(later, [*groups[2:], groups[0]], strict=True):
        assert_batch_equals(batch, group)

    del kept_slice, later
    pool = host_buffer_pool()
    assert len(pool._idle) <= pool.max_idle_blocks and pool.idle_bytes > 0


def test_batches_from_data_loader_workers_are_intact():
    rng = np.random.default_rng(9)
    examples = [make_example(random_label(40, 56, rng, 0.1), rng, path=f"f{i}") for i in range(12)]
    for example in examples:
        del example["original_image"], example["original_label"]
    loader = torch.utils.data.DataLoader(
        examples, batch_size=3, num_workers=2, collate_fn=SegmentationCollator(num_labels=NUM_LABELS)
    )
    # Hold every batch: each must keep its own contents while later ones are collated in the workers.
    batches = list(loader)
    assert len(batches) == 4
    for index, batch in enumerate(batches):
        assert_batch_equals(batch, examples[3 * index : 3 * index + 3])


def test_dropped_samples_keep_their_place_as_placeholders():
    rng = np.random.default_rng(4)
    good = make_example(random_label(32, 48, rng), rng)
    batch = SegmentationCollator(num_labels=NUM_LABELS)([None, good, None])
    assert batch["pixel_values"].shape == (3, 3, 32, 48)
    assert batch["pixel_values"][[0, 2]].eq(0).all() and batch["pixel_mask"][[0, 2]].eq(0).all()
    assert batch["mask_labels"][0].shape == (0, 32, 48) and batch["class_labels"][2].shape == (0,)
    assert batch["original_segmentation_maps"][0] is None and batch["original_images"][2] is None
    np.testing.assert_array_equal(batch["original_segmentation_maps"][1], good["original_label"])
    # A batch of dropped samples only still has one placeholder per sample.
    only = SegmentationCollator()([None, None])
    assert only["pixel_values"].shape[:2] == (2, 3)
    assert only["original_segmentation_maps"] == [None, None] and only["original_images"] == [None, None]
