"""Synthetic IDD scenes: layout, label maps equal to the rasterised polygons, determinism, statistics and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadseg_utils.cli import parse_size
from roadseg_utils.data import rasterize_polygons
from roadseg_utils.labels import IGNORE_INDEX, LEVEL3_NAMES, raw_name_to_id
from roadseg_utils.synthetic import (
    IMAGE_SUFFIX,
    LABEL_SUFFIX,
    POLYGONS_SUFFIX,
    generate_synthetic_idd,
    sequence_sizes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_SIZE = (90, 160)
STATS_SIZE = (72, 128)


def _frame_files(root: Path, split: str = "train") -> dict[tuple[str, str], dict[str, Path]]:
    files: dict[tuple[str, str], dict[str, Path]] = {}
    for kind, folder, suffix in (("image", "leftImg8bit", IMAGE_SUFFIX), ("label", "gtFine", LABEL_SUFFIX),
                                 ("polygons", "gtFine", POLYGONS_SUFFIX)):
        for path in (root / folder / split).glob(f"*/*{suffix}"):
            files.setdefault((path.parent.name, path.name[: -len(suffix)]), {})[kind] = path
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("small")
    frames = generate_synthetic_idd(root, num_images=60, num_sequences=6, image_size=SMALL_SIZE, seed=3, workers=1)
    return root, frames


@pytest.fixture(scope="module")
def stats_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("stats")
    frames = generate_synthetic_idd(root, num_images=300, num_sequences=12, image_size=STATS_SIZE, seed=0)
    return root, frames


@pytest.fixture(scope="module")
def stats_labels(stats_dataset: tuple[Path, list]) -> dict[tuple[str, str], np.ndarray]:
    root, _ = stats_dataset
    return {key: np.asarray(Image.open(paths["label"])) for key, paths in sorted(_frame_files(root).items())}


def test_layout_pairs_every_image_with_label_and_polygons(small_dataset):
    root, frames = small_dataset
    files = _frame_files(root)
    assert len(files) == len(frames) == 60
    assert sorted(files) == sorted((frame.sequence, frame.frame) for frame in frames)
    assert {frame.sequence for frame in frames} == {str(i) for i in range(6)}
    for (sequence, frame), paths in files.items():
        assert set(paths) == {"image", "label", "polygons"}, (sequence, frame)
        assert frame.isdigit() and len(frame) == 6
        image, label = Image.open(paths["image"]), Image.open(paths["label"])
        assert image.mode == "RGB" and label.mode == "L"
        assert image.size == label.size == (SMALL_SIZE[1], SMALL_SIZE[0])
        annotation = json.loads(paths["polygons"].read_text())
        assert (annotation["imgHeight"], annotation["imgWidth"]) == SMALL_SIZE
        assert [obj["id"] for obj in annotation["objects"]] == list(range(len(annotation["objects"])))
        assert all({"label", "polygon", "deleted"} <= set(obj) for obj in annotation["objects"])
    assert not list(root.rglob("*.tmp"))


def test_label_png_is_the_rasterised_polygons_of_every_frame(small_dataset):
    root, _ = small_dataset
    for paths in _frame_files(root).values():
        annotation = json.loads(paths["polygons"].read_text())
        expected = rasterize_polygons(annotation, level=3)
        np.testing.assert_array_equal(np.asarray(Image.open(paths["label"])), expected, err_msg=str(paths["label"]))
        points = np.concatenate([np.asarray(obj["polygon"], float).reshape(-1, 2) for obj in annotation["objects"]])
        assert points.min() >= 0
        assert points[:, 0].max() <= SMALL_SIZE[1] - 1 and points[:, 1].max() <= SMALL_SIZE[0] - 1


def test_returned_classes_match_the_label_files(small_dataset):
    root, frames = small_dataset
    for frame in frames:
        label = np.asarray(Image.open(frame.label_path))
        assert frame.classes == tuple(int(c) for c in np.unique(label) if c != IGNORE_INDEX)
        assert frame.image_path == root / "leftImg8bit" / "train" / frame.sequence / f"{frame.frame}{IMAGE_SUFFIX}"


def test_polygons_use_raw_idd_names_and_exercise_the_folding_rules(stats_dataset):
    root, _ = stats_dataset
    raw_names = raw_name_to_id(3)
    labels_seen, deleted_frames, short_frames = set(), [], []
    for paths in _frame_files(root).values():
        annotation = json.loads(paths["polygons"].read_text())
        for obj in annotation["objects"]:
            name = obj["label"]
            assert name in raw_names or name.removesuffix("group") in raw_names, name
            labels_seen.add(name)
            if obj["deleted"]:
                deleted_frames.append(paths)
            if len(obj["polygon"]) < 3:
                short_frames.append(paths)
    folding = labels_seen - set(LEVEL3_NAMES)
    assert {"parking", "animal", "polegroup"} <= folding
    assert any(name.endswith("group") and name not in raw_names for name in folding)
    assert any(raw_names.get(name) == IGNORE_INDEX for name in folding)
    assert deleted_frames and short_frames
    for paths in deleted_frames[:3] + short_frames[:3]:
        annotation = json.loads(paths["polygons"].read_text())
        np.testing.assert_array_equal(np.asarray(Image.open(paths["label"])), rasterize_polygons(annotation, level=3))


def test_same_seed_is_byte_identical_for_any_worker_count_and_other_seeds_differ(tmp_path):
    common = {"num_images": 10, "num_sequences": 3, "image_size": (48, 80)}
    generate_synthetic_idd(tmp_path / "serial", seed=5, workers=1, **common)
    generate_synthetic_idd(tmp_path / "pool", seed=5, workers=2, **common)
    generate_synthetic_idd(tmp_path / "other_seed", seed=6, workers=1, **common)
    generate_synthetic_idd(tmp_path / "val", seed=5, split="val", workers=1, **common)
    serial = _read_tree(tmp_path / "serial")
    assert len(serial) == 30
    assert _read_tree(tmp_path / "pool") == serial
    other = _read_tree(tmp_path / "other_seed")
    images = [name for name in serial if name.endswith(IMAGE_SUFFIX)]
    assert all(other.get(name) != serial[name] for name in images)
    val_images = {Path(name).name: data for name, data in _read_tree(tmp_path / "val").items()}
    assert sorted(val_images) == sorted(Path(name).name for name in serial)
    assert all(val_images[Path(name).name] != serial[name] for name in images)


def test_class_coverage_long_tail_and_uneven_sequences(stats_labels):
    images_with_class = np.zeros(len(LEVEL3_NAMES), dtype=int)
    sequence_counts: dict[str, int] = {}
    for (sequence, _), label in stats_labels.items():
        images_with_class += np.bincount(label.ravel(), minlength=256)[: len(LEVEL3_NAMES)] > 0
        sequence_counts[sequence] = sequence_counts.get(sequence, 0) + 1
    share = images_with_class / len(stats_labels)
    assert len(stats_labels) == 300 and len(sequence_counts) == 12
    assert (images_with_class > 0).sum() >= 20
    rare = [LEVEL3_NAMES[i] for i in np.flatnonzero((share > 0) & (share < 0.1))]
    assert len(rare) >= 3, dict(zip(LEVEL3_NAMES, share.round(3), strict=True))
    assert set(rare) <= {"traffic light", "bicycle", "bridge", "guard rail", "fence", "bus"}
    assert max(sequence_counts.values()) >= 3 * min(sequence_counts.values())


def test_frames_are_mostly_labelled(stats_labels):
    unlabelled = np.array([(label == IGNORE_INDEX).mean() for label in stats_labels.values()])
    assert unlabelled.max() < 0.2
    assert unlabelled.mean() < 0.05


def test_colours_carry_class_information_and_lighting_varies(stats_dataset, stats_labels):
    root, _ = stats_dataset
    files = _frame_files(root)
    pixels, classes, brightness = [], [], {}
    for key, label in list(stats_labels.items())[::3]:
        image = np.asarray(Image.open(files[key]["image"]), dtype=np.float32)
        brightness.setdefault(key[0], []).append(image.mean())
        labelled = label != IGNORE_INDEX
        # Dividing by the frame's mean colour takes out the lighting, as a normalising network layer would.
        pixels.append((image / image.reshape(-1, 3).mean(axis=0))[labelled])
        classes.append(label[labelled])
    fit_pixels, fit_classes = np.concatenate(pixels[::2]), np.concatenate(classes[::2])
    test_pixels, test_classes = np.concatenate(pixels[1::2]), np.concatenate(classes[1::2])
    present = np.unique(fit_classes)
    means = np.stack([fit_pixels[fit_classes == c].mean(axis=0) for c in present])
    nearest = present[np.argmin(((test_pixels[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)]
    recalls = [(nearest[test_classes == c] == c).mean() for c in np.unique(test_classes)]
    assert np.mean(recalls) > 4 / len(present)
    per_sequence = [np.mean(values) for values in brightness.values()]
    assert max(per_sequence) > 2 * min(per_sequence)


def test_interrupted_write_leaves_no_partial_png(tmp_path, monkeypatch):
    original_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        # The writer may hand save() a path or an open stream; either way the name holds the target's suffix.
        if IMAGE_SUFFIX in str(getattr(fp, "name", fp)):
            if hasattr(fp, "write"):
                fp.write(b"\x89PNG partial")
            else:
                Path(fp).write_bytes(b"\x89PNG partial")
            raise OSError("disk full")
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_synthetic_idd(tmp_path, num_images=2, num_sequences=1, image_size=(32, 48), workers=1)
    assert not list(tmp_path.rglob(f"*{IMAGE_SUFFIX}"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_refuses_to_mix_with_frames_of_another_run(tmp_path):
    generate_synthetic_idd(tmp_path, num_images=6, num_sequences=2, image_size=(32, 48), workers=1)
    generate_synthetic_idd(tmp_path, num_images=6, num_sequences=2, image_size=(32, 48), workers=1)
    with pytest.raises(FileExistsError, match="another run"):
        generate_synthetic_idd(tmp_path, num_images=4, num_sequences=2, image_size=(32, 48), workers=1)


def test_sequence_sizes_are_uneven_and_add_up():
    rng = np.random.default_rng(0)
    for num_images, num_sequences in ((300, 12), (60, 6), (7, 7), (1000, 40)):
        sizes = sequence_sizes(num_images, num_sequences, rng)
        assert sum(sizes) == num_images and len(sizes) == num_sequences and min(sizes) >= 1
        if num_images >= 5 * num_sequences:
            assert max(sizes) >= 3 * min(sizes)
    with pytest.raises(ValueError, match="num_sequences"):
        sequence_sizes(3, 4, rng)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sequences": 9, "num_images": 4}, "num_sequences"),
        ({"image_size": (8, 64)}, "image_size"),
        ({"split": "../train"}, "split"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, message):
    arguments = {"num_images": 4, "num_sequences": 2, "image_size": (32, 48)} | kwargs
    with pytest.raises(ValueError, match=message):
        generate_synthetic_idd(tmp_path, **arguments)


@pytest.mark.parametrize(("text", "size"), [("360x640", (360, 640)), ("90X160", (90, 160)), (" 512 ", (512, 512))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["360by640", "0x640", "-1x5", "", "12x", "1.5x3"])
def test_parse_size_rejects_bad_input(text):
    with pytest.raises(ValueError, match="HEIGHTxWIDTH|positive"):
        parse_size(text)


def test_cli_writes_a_dataset_and_rejects_a_bad_size(tmp_path):
    command = [sys.executable, "-m", "roadseg_utils.synthetic", "--output_dir", str(tmp_path / "cli"),
               "--num_images", "6", "--num_sequences", "2", "--image_size", "48x64", "--seed", "1"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 6 frames" in done.stdout
    files = _frame_files(tmp_path / "cli")
    assert len(files) == 6 and all(len(paths) == 3 for paths in files.values())
    assert Image.open(next(iter(files.values()))["image"]).size == (64, 48)
    bad = command[:-4] + ["--image_size", "360by640"]
    done = subprocess.run(bad, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--image_size" in done.stderr and "360by640" in done.stderr
