"""Tests for roadseg_utils.data: every layout, bad-sample errors, splits, the legacy pickle, rasterisation."""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
from PIL import Image
from transformers import HfArgumentParser

from roadseg_utils import data
from roadseg_utils.data import (
    SPLITS,
    BadSampleError,
    DataError,
    DataSourceArguments,
    EmptyDatasetError,
    HubDatasetUnavailableError,
    LabelValueError,
    MissingMaskError,
    SampleRecord,
    SizeMismatchError,
    UnreadableImageError,
    UnsafePickleError,
    dataset_column,
    find_records,
    lazy_dataset,
    load_legacy_pickle,
    load_segmentation_dataset,
    load_split_records,
    rasterize_polygons,
    read_label_map,
    source_label_set,
    split_dataset,
    split_records,
    validate_records,
    with_sample_transform,
)
from roadseg_utils.labels import get_label_set
from roadseg_utils.parallel import MIN_PARALLEL_SAMPLES

HEIGHT, WIDTH = 6, 8


def _image(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _label(seed: int, num_labels: int = 26, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    label = np.random.default_rng(seed + 1000).integers(0, num_labels, (height, width), dtype=np.uint8)
    label[0, 0] = 255
    return label


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_idd_tree(root: Path, frames: list[tuple[str, str, str]], level: int = 3) -> dict[str, np.ndarray]:
    """IDD tree with label-id PNGs (none for test folders); returns {relative image path: label map}."""
    num_labels = get_label_set(f"idd-level{level}").num_labels
    labels = {}
    for index, (split, sequence, frame) in enumerate(frames):
        image_path = root / "leftImg8bit" / split / sequence / f"{frame}_leftImg8bit.png"
        _save(image_path, _image(index))
        if split != "test":
            label = _label(index, num_labels)
            _save(root / "gtFine" / split / sequence / f"{frame}_gtFine_labellevel{level}Ids.png", label)
            labels[image_path.relative_to(root).as_posix()] = label
    return labels


def _rows_by_path(dataset_dict: datasets.DatasetDict) -> dict[str, dict]:
    return {row["path"]: row for split in SPLITS for row in dataset_dict[split]}


def _rect(label: str, x0: int, y0: int, x1: int, y1: int, **extra) -> dict:
    return {"label": label, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], **extra}


# ---------------------------------------------------------------------------------------------------------
# The package


def test_package_exports_every_public_name_without_importing_datasets():
    # A fresh interpreter: this test module has imported `datasets` already.
    code = ("import sys; from roadseg_utils import data; "
            "print([n for n in data.__all__ if not hasattr(data, n)], 'datasets' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[] False"
    used_by_callers = {"DataSourceArguments", "load_segmentation_dataset", "SampleVerdict", "IDD_IMAGE_SUFFIX"}
    assert used_by_callers <= set(data.__all__)


# ---------------------------------------------------------------------------------------------------------
# Rasterisation and label decoding


def test_rasterize_polygons_follows_official_rules():
    # Pillow fills an axis-aligned polygon with corners (x0, y0)-(x1, y1) including its edges, so a rectangle
    # covers (x1 - x0 + 1) * (y1 - y0 + 1) pixels; every expected count below is built from that by hand.
    objects = [
        _rect("road", 0, 0, 9, 9),  # 10 x 10 = 100
        _rect("cargroup", 2, 2, 5, 5),  # 4 x 4 = 16, on top of road
        _rect("license plate", 3, 3, 4, 3),  # 2 x 1 = 2, on top of the car -> ignore
        _rect("ego vehicle", 0, 9, 9, 9),  # 10 x 1 = 10, bottom row of the road -> ignore
        _rect("out of roi", 0, 8, 1, 8),  # 2 x 1 = 2, on the road -> ignore
        _rect("sky", 0, 0, 9, 9, deleted=1),  # deleted: skipped
        {"label": "bus", "polygon": [[0, 0], [9, 9]]},  # 2 points: skipped
    ]
    # Raw names to fold, one 2-pixel-wide column each: name k covers x 12+3k..13+3k, y 0..k -> 2 * (k + 1).
    folded = ["parking", "rail track", "animal", "caravan", "trailer", "train", "tunnel", "fallback background",
              "polegroup"]
    objects += [_rect(name, 12 + 3 * k, 0, 13 + 3 * k, k) for k, name in enumerate(folded)]
    annotation = {"imgHeight": 10, "imgWidth": 40, "objects": objects}

    label = rasterize_polygons(annotation, level=3, source="frame.json")

    counts = np.bincount(label.ravel(), minlength=256)
    expected = {
        0: 100 - 16 - 10 - 2,  # road minus car, ego-vehicle row and out-of-roi pixels
        9: 16 - 2,  # car ("cargroup") minus its licence plate
        1: 2 * 1,  # parking
        3: 2 * 2,  # rail track
        4: 2 * 3,  # animal
        12: 2 * 4 + 2 * 5 + 2 * 6,  # caravan, trailer, train
        23: 2 * 7,  # tunnel
        25: 2 * 8,  # fallback background
        20: 2 * 9,  # polegroup
    }
    expected[255] = 40 * 10 - sum(expected.values())
    assert {v: int(c) for v, c in enumerate(counts) if c} == expected
    assert (label[3, 3:5] == 255).all() and label[3, 5] == 9  # the plate sits on the car
    assert label.dtype == np.uint8 and label.shape == (10, 40)

    with pytest.raises(DataError, match=r"frame.json: unknown IDD label name 'spaceship'"):
        rasterize_polygons({"imgHeight": 4, "imgWidth": 4, "objects": [_rect("spaceship", 0, 0, 2, 2)]},
                           source="frame.json")


def test_read_label_map_keeps_palette_indices_and_rejects_colour_masks(tmp_path):
    values = np.array([[3, 200], [200, 3]], dtype=np.uint8)
    palette_mask = Image.frombytes("P", (2, 2), values.tobytes())
    palette_mask.putpalette([0] * 768)  # all-black colours: only the indices carry the ids
    palette_mask.save(tmp_path / "p.png")
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "i.png")  # a 16-bit PNG, read as mode I;16
    Image.fromarray(np.full((2, 2), 300, dtype=np.uint16)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")

    assert np.array_equal(read_label_map(tmp_path / "p.png"), values)
    decoded = read_label_map(tmp_path / "i.png")
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, values)
    with pytest.raises(DataError, match="big.png: label values span 300..300"):
        read_label_map(tmp_path / "big.png")
    with pytest.raises(DataError, match="rgb.png: mask has mode RGB"):
        read_label_map(tmp_path / "rgb.png")


# ---------------------------------------------------------------------------------------------------------
# Layouts


def test_idd_tree_with_level3_pngs_loads_lazily_with_contract_columns(tmp_path, monkeypatch, caplog):
    frames = [("train", "0", f"00000{i}") for i in range(3)] + [("train", "1", f"00001{i}") for i in range(3)]
    frames += [("val", "7", "000070"), ("val", "7", "000071"), ("test", "9", "000090")]
    labels = _write_idd_tree(tmp_path, frames)
    decoded_images = []
    real_to_rgb = lazy_dataset.to_rgb_image
    monkeypatch.setattr(lazy_dataset, "to_rgb_image", lambda value, source="": decoded_images.append(source) or
                        real_to_rgb(value, source))

    with caplog.at_level(logging.WARNING):
        loaded = load_segmentation_dataset(DataSourceArguments(data_dir=str(tmp_path), num_workers=1), seed=0)

    assert decoded_images == []  # loading validated headers and masks but decoded no image
    assert "no gtFine/test folder" in caplog.text
    assert list(loaded) == list(SPLITS)
    assert sorted(dataset_column(loaded["validation"], "path")) == [
        "leftImg8bit/val/7/000070_leftImg8bit.png", "leftImg8bit/val/7/000071_leftImg8bit.png"]
    train_paths, test_paths = dataset_column(loaded["train"], "path"), dataset_column(loaded["test"], "path")
    assert len(test_paths) >= 1 and sorted(train_paths + test_paths) == sorted(p for p in labels if "/train/" in p)
    assert decoded_images == []

    row = loaded["train"][0]
    assert len(decoded_images) == 1
    validated = load_split_records(DataSourceArguments(data_dir=str(tmp_path), num_workers=1), seed=0)
    assert all([r.path for r in validated[s].records] == dataset_column(loaded[s], "path") for s in SPLITS)
    assert np.array_equal(validated["train"].histograms[0], np.bincount(row["label"].ravel(), minlength=256))
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    assert row["image"].size == (WIDTH, HEIGHT) and (row["height"], row["width"]) == (HEIGHT, WIDTH)
    image_index = frames.index(("train", row["sequence"], row["path"].split("/")[-1].split("_")[0]))
    assert np.array_equal(np.asarray(row["image"]), _image(image_index))
    assert row["label"].dtype == np.uint8 and np.array_equal(row["label"], labels[row["path"]])
    assert row["sequence"] in ("0", "1")


def test_idd_tree_reads_the_masks_of_the_requested_level(tmp_path):
    frames = [("train", "0", f"00000{i}") for i in range(4)] + [("val", "5", "000050"), ("test", "6", "000060")]
    level3 = _write_idd_tree(tmp_path, frames, level=3)
    level2 = _write_idd_tree(tmp_path, frames, level=2)  # same images, a second set of masks
    assert any(not np.array_equal(level3[p], level2[p]) for p in level3)

    rows = _rows_by_path(load_segmentation_dataset(
        DataSourceArguments(data_dir=str(tmp_path), label_set="idd-level2", num_workers=1), seed=0))

    assert rows.keys() == level2.keys()
    assert all(np.array_equal(rows[p]["label"], level2[p]) for p in rows)


@pytest.mark.parametrize(("level", "road", "car", "bicycle"), [(3, 0, 9, 7), (2, 0, 7, 6), (1, 0, 3, 3)])
def test_idd_tree_with_polygon_json_only_is_rasterised_at_each_level(tmp_path, level, road, car, bicycle):
    annotation = {"imgHeight": HEIGHT, "imgWidth": WIDTH, "objects": [
        _rect("road", 0, 3, 7, 5), _rect("car", 0, 0, 2, 2), _rect("bicycle", 4, 0, 5, 1)]}
    for index, (split, frame) in enumerate([("train", f"00000{i}") for i in range(4)] + [("val", "000050")]):
        _save(tmp_path / "leftImg8bit" / split / "3" / f"{frame}_leftImg8bit.jpg", _image(index))
        polygons = tmp_path / "gtFine" / split / "3" / f"{frame}_gtFine_polygons.json"
        polygons.parent.mkdir(parents=True, exist_ok=True)
        polygons.write_text(json.dumps(annotation))

    rows = _rows_by_path(load_segmentation_dataset(
        DataSourceArguments(data_dir=str(tmp_path), label_set=f"idd-level{level}", num_workers=1), seed=0))

    assert len(rows) == 5 and all(p.endswith("_leftImg8bit.jpg") for p in rows)
    for row in rows.values():
        assert np.array_equal(row["label"], rasterize_polygons(annotation, level))
        assert row["label"][4, 4] == road and row["label"][1, 1] == car and row["label"][0, 5] == bicycle
        assert row["label"][2, 7] == 255  # nothing drawn there


def test_flat_folders_pair_images_and_masks_by_stem(tmp_path):
    labels = {}
    for index in range(10):
        _save(tmp_path / "imgs" / f"s{index}.jpg", _image(index))
        labels[f"imgs/s{index}.jpg"] = _label(index)
        _save(tmp_path / "masks" / f"s{index}_mask.png", labels[f"imgs/s{index}.jpg"])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    args = DataSourceArguments(data_dir=str(tmp_path), image_dir="imgs", mask_dir="masks", image_suffix=".jpg",
                               mask_suffix="_mask.png", train_fraction=0.6, val_fraction=0.2, test_fraction=0.2,
                               num_workers=1)

    loaded = load_segmentation_dataset(args, seed=3)

    assert [len(loaded[s]) for s in SPLITS] == [6, 2, 2]
    rows = _rows_by_path(loaded)
    assert rows.keys() == labels.keys()
    assert all(np.array_equal(rows[p]["label"], labels[p]) and rows[p]["sequence"] == "imgs" for p in rows)
    assert all(rows[p]["image"].mode == "RGB" and rows[p]["image"].size == (WIDTH, HEIGHT) for p in rows)


def test_max_samples_caps_every_split_with_a_seeded_choice(tmp_path):
    for index in range(20):
        _save(tmp_path / "imgs" / f"s{index:02d}.png", _image(index))
        _save(tmp_path / "masks" / f"s{index:02d}.png", _label(index))
    args = DataSourceArguments(image_dir=str(tmp_path / "imgs"), mask_dir=str(tmp_path / "masks"),
                               train_fraction=0.5, val_fraction=0.25, test_fraction=0.25, max_samples=3)

    picked = {s: [r.path for r in part.records] for s, part in load_split_records(args, seed=5).items()}

    assert [len(picked[s]) for s in SPLITS] == [3, 3, 3]
    assert picked == {s: [r.path for r in part.records] for s, part in load_split_records(args, seed=5).items()}
    assert picked != {s: [r.path for r in part.records] for s, part in load_split_records(args, seed=6).items()}


def test_flat_folder_shared_by_images_and_masks_does_not_take_masks_for_images(tmp_path):
    for index in range(3):
        _save(tmp_path / "both" / f"x{index}.png", _image(index))
        _save(tmp_path / "both" / f"x{index}_mask.png", _label(index))

    records = find_records(DataSourceArguments(image_dir=str(tmp_path / "both"), mask_dir=str(tmp_path / "both"),
                                               mask_suffix="_mask.png"))

    assert [(Path(r.image_path).name, Path(r.label_path).name) for r in records] == [
        (f"x{i}.png", f"x{i}_mask.png") for i in range(3)]
    assert [r.path for r in records] == [f"both/x{i}.png" for i in range(3)]
    assert {r.sequence for r in records} == {"both"} and {r.split for r in records} == {None}


def test_save_to_disk_folder_with_array_labels_loads(tmp_path):
    features = datasets.Features({
        "pixel_values": datasets.Image(),
        "annotation": datasets.List(datasets.List(datasets.Value("uint8"))),
    })
    splits = {"train": range(6), "validation": range(6, 8), "test": range(8, 10)}
    datasets.DatasetDict({
        name: datasets.Dataset.from_dict(
            {"pixel_values": [Image.fromarray(_image(i)) for i in ids],
             # A hidden test set: images without labels, so test is carved from train instead.
             "annotation": [_label(i).tolist() if name != "test" else None for i in ids]}, features=features)
        for name, ids in splits.items()
    }).save_to_disk(str(tmp_path / "saved"))
    args = DataSourceArguments(dataset_name=str(tmp_path / "saved"), image_column="pixel_values",
                               label_column="annotation", num_workers=1)

    loaded = load_segmentation_dataset(args, seed=0)

    assert len(loaded["validation"]) == 2 and len(loaded["train"]) + len(loaded["test"]) == 6
    assert len(loaded["test"]) >= 1
    images = {i: _image(i).tobytes() for i in range(8)}
    for split in SPLITS:
        for row in loaded[split]:
            assert row["image"].mode == "RGB" and row["label"].dtype == np.uint8 and row["label"].ndim == 2
            index = next(i for i, b in images.items() if b == np.asarray(row["image"]).tobytes())
            assert np.array_equal(row["label"], _label(index))
            assert row["path"].startswith("train/" if index < 6 else "validation/") and row["sequence"] == "saved"


def _save_annotated_dataset(folder: Path) -> None:
    """A save_to_disk dataset whose label maps are in an 'annotation' column, beside a class-id 'label' column."""
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=["day", "night"]),
        "annotation": datasets.Image(),
    })
    datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_image(i)) for i in range(6)], "label": [i % 2 for i in range(6)],
         "annotation": [Image.fromarray(_label(i, num_labels=3)) for i in range(6)]},
        features=features,
    ).save_to_disk(str(folder))


def test_annotation_column_is_found_without_label_column(tmp_path, caplog):
    _save_annotated_dataset(tmp_path / "annotated")

    with caplog.at_level(logging.INFO, logger="roadseg_utils"):
        loaded = load_segmentation_dataset(DataSourceArguments(dataset_name=str(tmp_path / "annotated"),
                                                               num_workers=1), seed=0)

    rows = [row for split in SPLITS for row in loaded[split]]
    assert len(rows) == 6
    for row in rows:
        index = next(i for i in range(6) if np.array_equal(np.asarray(row["image"]), _image(i)))
        assert np.array_equal(row["label"], _label(index, num_labels=3))
    assert "label maps read from column 'annotation'" in caplog.text


def test_no_label_map_column_names_the_columns_looked_for(tmp_path):
    datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_image(i)) for i in range(3)], "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    ).save_to_disk(str(tmp_path / "classification"))

    with pytest.raises(DataError) as error:
        load_segmentation_dataset(DataSourceArguments(dataset_name=str(tmp_path / "classification"), num_workers=1))
    message = str(error.value)
    assert "no label column of label maps (looked for label, annotation, segmentation, mask)" in message
    assert "set --label_column" in message and str(tmp_path / "classification") in message


def test_a_dataset_folder_names_its_classes_with_its_own_id2label_json(tmp_path):
    folder = tmp_path / "lanes"
    _save_annotated_dataset(folder)
    (folder / "id2label.json").write_text(json.dumps({"0": "lane", "1": "kerb", "2": "verge"}))

    shipped = source_label_set(DataSourceArguments(dataset_name=str(folder)))
    assert shipped.id2label == {0: "lane", 1: "kerb", 2: "verge"} and shipped.name == "lanes"
    # --label_set wins over the shipped file; datasets without one keep the default.
    assert source_label_set(DataSourceArguments(dataset_name=str(folder), label_set="idd-level1")).num_labels == 7
    (folder / "id2label.json").unlink()
    assert source_label_set(DataSourceArguments(dataset_name=str(folder))).name == "idd-level3"


def test_a_hub_dataset_names_its_classes_with_the_id2label_json_of_its_repository(tmp_path, monkeypatch):
    shipped = tmp_path / "hub-cache" / "id2label.json"
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({"0": "road", "1": "not road"}))
    asked = []

    def fake_download(repo_id: str, filename: str, repo_type: str) -> str:
        asked.append((repo_id, filename, repo_type))
        return str(shipped)

    monkeypatch.setattr(data.hf_source, "hf_hub_download", fake_download)
    label_set = source_label_set(DataSourceArguments(dataset_name="someone/road-masks"))
    assert asked == [("someone/road-masks", "id2label.json", "dataset")]
    assert label_set.id2label == {0: "road", 1: "not road"} and label_set.name == "road-masks"

    def missing(repo_id: str, filename: str, repo_type: str) -> str:
        raise huggingface_hub.errors.EntryNotFoundError("404 id2label.json")

    monkeypatch.setattr(data.hf_source, "hf_hub_download", missing)
    assert source_label_set(DataSourceArguments(dataset_name="someone/road-masks")).name == "idd-level3"


def test_imagefolder_with_label_images_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "segfolder"
    for split, ids in (("train", range(5)), ("test", range(5, 7))):
        lines = []
        for i in ids:
            _save(folder / split / "images" / f"{i}.png", _image(i))
            _save(folder / split / "masks" / f"{i}.png", _label(i))
            lines.append(json.dumps({"file_name": f"images/{i}.png", "label_file_name": f"masks/{i}.png"}))
        (folder / split / "metadata.jsonl").write_text("\n".join(lines))

    loaded = load_segmentation_dataset(DataSourceArguments(dataset_name=str(folder), num_workers=1), seed=0)

    assert sorted(dataset_column(loaded["test"], "path")) == ["test/images/5.png", "test/images/6.png"]
    assert len(loaded["train"]) + len(loaded["validation"]) == 5 and len(loaded["validation"]) >= 1
    for path, row in _rows_by_path(loaded).items():
        index = int(Path(path).stem)
        assert np.array_equal(np.asarray(row["image"]), _image(index))
        assert np.array_equal(row["label"], _label(index)) and row["sequence"] == "images"


def test_with_sample_transform_runs_on_decoded_rows(tmp_path):
    _write_idd_tree(tmp_path, [("train", "0", f"00000{i}") for i in range(4)])
    train = load_segmentation_dataset(DataSourceArguments(data_dir=str(tmp_path), num_workers=1), seed=0)["train"]

    def shape_of(batch):
        return {"shape": [np.asarray(image).shape + label.shape for image, label in
                          zip(batch["image"], batch["label"], strict=True)]}

    transformed = with_sample_transform(train, shape_of)
    assert transformed[0] == {"shape": (HEIGHT, WIDTH, 3, HEIGHT, WIDTH)}
    restored = with_sample_transform(transformed, None)
    assert isinstance(restored[0]["image"], Image.Image) and restored[0]["label"].shape == (HEIGHT, WIDTH)


# ---------------------------------------------------------------------------------------------------------
# Bad samples


def _make_bad(root: Path, problem: str, frame: str, sequence: str = "0") -> None:
    image = root / "leftImg8bit" / "train" / sequence / f"{frame}_leftImg8bit.png"
    mask = root / "gtFine" / "train" / sequence / f"{frame}_gtFine_labellevel3Ids.png"
    if problem == "corrupt":
        image.write_bytes(image.read_bytes()[:-30])  # a half-written file: the header reads, the data does not
    elif problem == "missing":
        mask.unlink()
    elif problem == "size":
        _save(mask, _label(0, height=HEIGHT - 1))
    else:
        label = _label(0)
        label[2, 3] = 77
        _save(mask, label)


BAD_SAMPLES = {
    "corrupt": (UnreadableImageError, "cannot read image"),
    "missing": (MissingMaskError, "mask {root}/gtFine/train/0/{frame}_gtFine_labellevel3Ids.png does not exist"),
    "size": (SizeMismatchError, f"mask is {HEIGHT - 1}x{WIDTH} but image is {HEIGHT}x{WIDTH}"),
    "value77": (LabelValueError, "mask holds label values 77 outside idd-level3"),
}


@pytest.mark.parametrize("problem", sorted(BAD_SAMPLES))
def test_each_bad_sample_gets_its_own_clear_error(tmp_path, problem):
    _write_idd_tree(tmp_path, [("train", "0", f"00000{i}") for i in range(5)] + [("train", "0", "000bad")])
    _make_bad(tmp_path, problem, "000bad")
    error_type, message = BAD_SAMPLES[problem]

    with pytest.raises(BadSampleError) as caught:
        load_segmentation_dataset(DataSourceArguments(data_dir=str(tmp_path), num_workers=1), seed=0)

    assert type(caught.value) is error_type
    bad_image = str(tmp_path / "leftImg8bit" / "train" / "0" / "000bad_leftImg8bit.png")
    assert caught.value.path == bad_image and str(caught.value).startswith(f"{bad_image}: ")
    assert message.format(root=tmp_path, frame="000bad") in str(caught.value)


def test_skip_drops_exactly_the_bad_samples_and_loads_the_rest(tmp_path, caplog):
    good = _write_idd_tree(tmp_path, [("train", "0", f"00000{i}") for i in range(6)])
    _write_idd_tree(tmp_path, [("train", "0", f"000{p}") for p in sorted(BAD_SAMPLES)])
    for problem in BAD_SAMPLES:
        _make_bad(tmp_path, problem, f"000{problem}")
    args = DataSourceArguments(data_dir=str(tmp_path), on_bad_sample="skip", num_workers=1)

    with caplog.at_level(logging.WARNING):
        loaded = load_segmentation_dataset(args, seed=0)

    rows = _rows_by_path(loaded)
    assert rows.keys() == good.keys()
    assert all(np.array_equal(rows[p]["label"], good[p]) for p in rows)
    for problem, (_, message) in BAD_SAMPLES.items():
        assert f"000{problem}_leftImg8bit.png: {message.format(root=tmp_path, frame=f'000{problem}')}" in caplog.text
    assert "skipped 4 of 10 samples" in caplog.text

    result = validate_records(find_records(args), get_label_set(), "skip", num_workers=1)
    assert sorted(Path(name).name.split("_")[0] for name, _ in result.skipped) == sorted(
        f"000{p}" for p in BAD_SAMPLES)
    assert [r.path for r in result.records] == sorted(good)
    expected_histograms = np.stack([np.bincount(good[r.path].ravel(), minlength=256) for r in result.records])
    assert np.array_equal(result.histograms, expected_histograms)
    assert result.sizes == [(HEIGHT, WIDTH)] * 6


def test_parallel_validation_matches_serial(tmp_path):
    frames = [("train", str(i % 5), f"{i:06d}") for i in range(MIN_PARALLEL_SAMPLES + 6)]
    _write_idd_tree(tmp_path, frames)
    _make_bad(tmp_path, "value77", "000003", sequence="3")
    _make_bad(tmp_path, "missing", "000040", sequence="0")
    records = find_records(DataSourceArguments(data_dir=str(tmp_path)))

    serial = validate_records(records, get_label_set(), "skip", num_workers=1)
    parallel = validate_records(records, get_label_set(), "skip", num_workers=2)

    assert [r.path for r in parallel.records] == [r.path for r in serial.records]
    assert len(serial.records) == len(records) - 2 and parallel.skipped == serial.skipped
    assert np.array_equal(parallel.histograms, serial.histograms)


def test_empty_datasets_are_errors_naming_the_folder(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "0").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match=f"{tmp_path}: no annotated images found"):
        load_segmentation_dataset(DataSourceArguments(data_dir=str(tmp_path), num_workers=1))

    _write_idd_tree(tmp_path, [("train", "0", "000bad")])
    _make_bad(tmp_path, "value77", "000bad")
    with pytest.raises(EmptyDatasetError, match=f"{tmp_path}: all 1 samples were skipped as bad"):
        load_segmentation_dataset(DataSourceArguments(data_dir=str(tmp_path), on_bad_sample="skip", num_workers=1))


# ---------------------------------------------------------------------------------------------------------
# Splits


def _records(sequence_sizes: list[int]) -> list[SampleRecord]:
    return [SampleRecord(f"/d/seq{s:02d}/{i:03d}.png", f"/d/seq{s:02d}/{i:03d}_mask.png", f"seq{s:02d}", None)
            for s, size in enumerate(sequence_sizes) for i in range(size)]


def test_split_records_is_seeded_and_independent_of_input_order():
    records = _records([5] * 8)
    fractions = {"train": 0.7, "validation": 0.2, "test": 0.1}
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)

    first = split_records(records, fractions, seed=0)

    assert split_records(shuffled, fractions, seed=0) == first
    assert split_records(records, fractions, seed=1)["train"] != first["train"]
    assert [len(first[s]) for s in SPLITS] == [28, 8, 4]
    assert sorted(r.path for s in SPLITS for r in first[s]) == sorted(r.path for r in records)


def test_split_by_sequence_keeps_every_sequence_in_one_split():
    sizes = np.random.default_rng(0).integers(1, 9, 30).tolist()
    records = _records(sizes)
    fractions = {"train": 0.7, "validation": 0.15, "test": 0.15}

    parts = split_records(records, fractions, seed=4, split_by="sequence")

    owners = {}
    for split, members in parts.items():
        for record in members:
            assert owners.setdefault(record.sequence, split) == split
    assert len(owners) == 30 and sum(len(m) for m in parts.values()) == len(records)
    for split, share in fractions.items():
        assert abs(len(parts[split]) / len(records) - share) < 0.06
    assert split_records(list(reversed(records)), fractions, seed=4, split_by="sequence") == parts


def test_split_dataset_by_sequence_keeps_the_decoding(tmp_path):
    _write_idd_tree(tmp_path, [("train", str(s), f"{s}0000{i}") for s in range(6) for i in range(2)])
    train = load_segmentation_dataset(
        DataSourceArguments(data_dir=str(tmp_path), train_fraction=1.0, val_fraction=0.0, test_fraction=0.0,
                            num_workers=1), seed=0)["train"]

    parts = split_dataset(train, {"train": 0.5, "validation": 0.5}, seed=0, split_by="sequence")

    sequences = {name: set(dataset_column(part, "sequence")) for name, part in parts.items()}
    assert not sequences["train"] & sequences["validation"] and len(parts["train"]) + len(parts["validation"]) == 12
    assert parts["validation"][0]["label"].dtype == np.uint8


@pytest.mark.parametrize("fractions", [(0.5, 0.045, 0.1), (1.1, -0.1, 0.0)])
def test_arguments_reject_fractions_that_do_not_sum_to_one(fractions):
    with pytest.raises(ValueError, match="must each be >= 0 and sum to 1"):
        DataSourceArguments(train_fraction=fractions[0], val_fraction=fractions[1], test_fraction=fractions[2])


def test_arguments_parse_from_the_command_line():
    (args,) = HfArgumentParser(DataSourceArguments).parse_args_into_dataclasses(
        ["--data_dir", "idd", "--split_by", "sequence", "--on_bad_sample", "skip", "--max_samples", "5"])
    assert (args.data_dir, args.split_by, args.on_bad_sample, args.max_samples) == ("idd", "sequence", "skip", 5)
    assert args.source_kind() == "idd"


# ---------------------------------------------------------------------------------------------------------
# The legacy pickle


class _RunsOsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsSubprocess(_RunsOsSystem):
    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


class _RunsEval(_RunsOsSystem):
    def __reduce__(self):
        return builtins.eval, (f"__import__('os').system('touch {self.marker}')",)


@pytest.mark.parametrize(("payload", "global_name"), [
    (_RunsOsSystem, f"{os.system.__module__}.system"), (_RunsSubprocess, "subprocess.call"),
    (_RunsEval, "builtins.eval"),
])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    rows = [{"pixel_values": _image(0), "label": _label(0), "extra": payload(marker)}]
    crafted = tmp_path / "legacy.pkl"
    crafted.write_bytes(pickle.dumps(rows))

    with pytest.raises(UnsafePickleError) as caught:
        load_legacy_pickle(crafted)
    with pytest.raises(pickle.UnpicklingError):
        load_segmentation_dataset(DataSourceArguments(pickle_path=str(crafted)))

    assert f"{crafted}: refused to load global {global_name}" in str(caught.value)
    assert not marker.exists()
    # The payload is live: an unrestricted load would run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps([payload(control)]))
    assert control.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_legacy_pickle_loads_with_contract_columns(tmp_path, protocol):
    rows = [{"pixel_values": Image.fromarray(_image(i)) if i % 2 else _image(i), "label": _label(i).astype(np.int64)}
            for i in range(10)]
    rows[3]["label"][1, 1] = 77
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(rows, protocol=protocol))

    with pytest.raises(LabelValueError, match="legacy.pkl#000003: mask holds label values 77"):
        load_segmentation_dataset(DataSourceArguments(pickle_path=str(legacy)), seed=0)
    loaded = load_segmentation_dataset(DataSourceArguments(pickle_path=str(legacy), on_bad_sample="skip"), seed=0)

    rows_by_path = _rows_by_path(loaded)
    assert sorted(rows_by_path) == [f"legacy.pkl#{i:06d}" for i in range(10) if i != 3]
    assert len(loaded["test"]) >= 1 and len(loaded["validation"]) >= 1
    for path, row in rows_by_path.items():
        index = int(path.split("#")[1])
        assert row["image"].mode == "RGB" and np.array_equal(np.asarray(row["image"]), _image(index))
        assert row["label"].dtype == np.uint8 and np.array_equal(row["label"], _label(index))
        assert row["sequence"] == "legacy" and (row["height"], row["width"]) == (HEIGHT, WIDTH)


# ---------------------------------------------------------------------------------------------------------
# Hub


def test_offline_hub_name_gives_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubDatasetUnavailableError) as caught:
        load_segmentation_dataset(DataSourceArguments(dataset_name="roadseg-tests/no-such-dataset"))

    message = str(caught.value)
    assert "\n" not in message and "'roadseg-tests/no-such-dataset'" in message
    assert "save_to_disk folder or an imagefolder directory" in message
    with pytest.raises(DataError, match="./no/such/folder: not a dataset folder"):
        load_segmentation_dataset(DataSourceArguments(dataset_name="./no/such/folder"))


def test_pixel_counts_equal_bincount_and_stay_exact_beyond_float32_integers():
    from roadseg_utils.labels import pixel_counts

    rng = np.random.default_rng(4)
    label = rng.integers(0, 256, (90, 160), dtype=np.uint8)
    expected = np.bincount(label.ravel(), minlength=256)
    assert pixel_counts(label).dtype == np.int64 and np.array_equal(pixel_counts(label), expected)
    assert np.array_equal(pixel_counts(label[::2, 1::3]), np.bincount(label[::2, 1::3].ravel(), minlength=256))
    assert np.array_equal(pixel_counts(label.astype(np.int32)), expected)
    # OpenCV counts in float32, which cannot hold 2**24 + 1.
    large = np.zeros((1, (1 << 24) + 2), dtype=np.uint8)
    large[0, -1] = 7
    counts = pixel_counts(large)
    assert counts[0] == (1 << 24) + 1 and counts[7] == 1 and counts.sum() == large.size


# ---------------------------------------------------------------------------------------------------------
# Rows decoded later: SampleDecoder errors, BadSampleGuard, errors rebuilt from one message


@pytest.mark.parametrize("kind", [c.__name__ for c in BadSampleError.__subclasses__()])
def test_every_bad_sample_error_pickles_and_rebuilds_from_its_message(kind):
    cls = getattr(data, kind)
    err = cls("/data/a.png", "cannot read image (x: y)")
    for copy in (pickle.loads(pickle.dumps(err)), cls(str(err))):
        assert type(copy) is cls and (copy.path, copy.problem) == (err.path, err.problem) and str(copy) == str(err)


def test_sample_decoder_names_the_row_of_a_bad_image_or_mask(tmp_path):
    records = []
    for i in range(2):
        _save(tmp_path / f"img{i}.png", _image(i))
        _save(tmp_path / f"mask{i}.png", _label(i))
        records.append(SampleRecord(str(tmp_path / f"img{i}.png"), str(tmp_path / f"mask{i}.png"), "s", "train"))
    dataset = data.records_to_dataset(records, get_label_set("idd-level3"))
    (tmp_path / "img0.png").write_bytes(b"not an image")
    Image.fromarray(_label(1)).convert("RGB").save(tmp_path / "mask1.png")

    with pytest.raises(UnreadableImageError) as image_error:
        dataset[0]
    with pytest.raises(data.UnreadableMaskError) as mask_error:
        dataset[1]
    assert image_error.value.path == str(tmp_path / "img0.png") and "not an image file" in image_error.value.problem
    assert mask_error.value.path == str(tmp_path / "img1.png")
    assert mask_error.value.problem == f"cannot read mask ({tmp_path / 'mask1.png'}: mask has mode RGB; expected a " \
        "single-channel label-id image (L, P or I))"
    guard = data.BadSampleGuard(dataset, "skip", substitute=False)
    assert len(guard) == 2 and guard[0] is None and guard[1] is None
    with pytest.raises(EmptyDatasetError, match="^dataset: all 2 samples are bad"):
        data.BadSampleGuard(dataset, "skip")[1]
