"""IDD label sets at every level, the level mapping, and custom id2label files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from roadseg_utils.labels import (
    RAW_LABELS,
    LabelSetError,
    get_label_set,
    idd_label_set,
    load_id2label_file,
    raw_name_to_id,
)

# From docs/DESIGN.md's table: (level-3 id, name, colour, level-2 id, level-1 id) for a sample of rows.
DESIGN_ROWS = [
    (0, "road", (128, 64, 128), 0, 0),
    (1, "drivable fallback", (81, 0, 81), 1, 0),
    (7, "bicycle", (119, 11, 32), 6, 3),
    (8, "autorickshaw", (255, 204, 54), 7, 3),
    (12, "vehicle fallback", (136, 143, 153), 8, 3),
    (16, "guard rail", (180, 165, 180), 10, 4),
    (21, "obs-str-bar-fallback", (169, 187, 214), 12, 4),
    (23, "bridge", (150, 100, 100), 13, 5),
    (25, "sky", (70, 130, 180), 15, 6),
]


def test_level_sizes():
    assert [idd_label_set(level).num_labels for level in (1, 2, 3, 4)] == [7, 16, 26, 30]


@pytest.mark.parametrize(("level3", "name", "color", "level2", "level1"), DESIGN_ROWS)
def test_level3_matches_design_table(level3, name, color, level2, level1):
    label_set = idd_label_set(3)
    assert label_set.id2label[level3] == name
    assert label_set.colors[level3] == color
    assert label_set.coarser["level2"][level3] == level2
    assert label_set.coarser["level1"][level3] == level1


def test_level_mapping_is_consistent_through_level2():
    level3, level2 = idd_label_set(3), idd_label_set(2)
    for l3, l2 in level3.coarser["level2"].items():
        assert level2.coarser["level1"][l2] == level3.coarser["level1"][l3]


def test_raw_names_fold_as_documented():
    to_l3 = raw_name_to_id(3)
    folds = {"parking": 1, "rail track": 3, "animal": 4, "caravan": 12, "trailer": 12, "train": 12,
             "polegroup": 20, "tunnel": 23, "fallback background": 25}
    assert {name: to_l3[name] for name in folds} == folds
    for void in ("unlabeled", "ego vehicle", "rectification border", "out of roi", "license plate"):
        assert to_l3[void] == 255
    assert len({row.raw_id for row in RAW_LABELS}) == 40


def test_lookup_table_maps_label_maps_to_coarser_levels():
    label_set = idd_label_set(3)
    label_map = np.array([[0, 1, 7], [8, 25, 255]], dtype=np.uint8)
    assert label_set.lookup_to("level1")[label_map].tolist() == [[0, 0, 3], [3, 6, 255]]


def test_custom_label_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"id2label": {"0": "road", "1": "car"}, "colors": {"0": [1, 2, 3]}}))
    label_set = get_label_set(str(path))
    assert label_set.id2label == {0: "road", 1: "car"} and label_set.label2id == {"road": 0, "car": 1}
    assert label_set.colors[0] == (1, 2, 3) and len(label_set.colors[1]) == 3
    assert label_set.palette.shape == (256, 3)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ("[1, 2]", "JSON object"),
        ('{"0": "a", "2": "b"}', "without gaps"),
        ('{"x": "a"}', "integers"),
        ("{", "not valid JSON"),
        ('{"0": "a", "0": "b"}', "'0' appears more than once"),
        ('{"0": "a", "00": "b"}', "class id 0 appears more than once"),
        ('{"0": "a", "1": "a"}', "class name 'a' is given to more than one id"),
        ('{"0": ""}', "non-empty string"),
        ('{"id2label": {"0": "a"}, "colors": {"0": [1, 2]}}', "colour of class 0"),
        ('{"id2label": {"0": "a"}, "colors": {"3": [1, 2, 3]}}', "not a class id"),
        (json.dumps({str(i): f"c{i}" for i in range(256)}), "256 classes, at most 255"),
    ],
)
def test_bad_custom_label_files_name_the_file(tmp_path, payload, problem):
    path = tmp_path / "bad.json"
    path.write_text(payload)
    with pytest.raises(LabelSetError, match=problem) as info:
        load_id2label_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_255_classes_fit_and_a_missing_file_is_named(tmp_path):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({str(i): f"c{i}" for i in range(255)}))
    assert load_id2label_file(path).num_labels == 255
    with pytest.raises(LabelSetError, match="label set file not found"):
        get_label_set(str(tmp_path / "missing.json"))


def test_unknown_label_set_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown label set 'cityscapes'"):
        get_label_set("cityscapes")
    with pytest.raises(ValueError, match="level must be one of"):
        get_label_set("idd-level5")


def test_label_set_fifo_and_deep_nesting_are_one_line_errors(tmp_path):
    fifo = tmp_path / "labels.json"
    os.mkfifo(fifo)
    # A FIFO nobody writes to would block a plain read forever; the check must answer at once.
    with pytest.raises(LabelSetError, match="not a regular file"):
        load_id2label_file(fifo)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LabelSetError, match="nested too deeply"):
        load_id2label_file(deep)
