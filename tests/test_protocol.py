"""The IDD official protocol (run_eval.py --protocol idd) against the official formulas, written out here anew."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import EvalResult, ModelCard
from PIL import Image

import run_eval
from roadseg_utils import protocol
from roadseg_utils.card import model_index_results, update_model_card_eval_results
from roadseg_utils.confusion import StreamingConfusionMatrix
from roadseg_utils.evaluation import render_report
from roadseg_utils.labels import LEVEL3_NAMES, idd_label_set
from roadseg_utils.metrics import per_category_iou
from roadseg_utils.modeling import load_image_processor
from roadseg_utils.output_dir import LOCK_FILE
from roadseg_utils.synthetic import generate_synthetic_idd

ROOT = Path(__file__).resolve().parents[1]
LEVEL3 = idd_label_set(3)
RESOLUTION, FRAME = 240, (426, 240)  # the official --res 240: the smallest frame keeps the test quick
SIZES = {"seqsmall": (90, 160), "seqlarge": (180, 320)}  # two frame sizes in one IDD tree
# The official script's groups, copied from evaluation/evaluate_mIoU.py.
MAPPING_2_TO_3 = [[0], [1], [2], [3], [4], [5], [6, 7], [8, 9], [10, 11, 12], [13, 14], [15, 16], [17, 18, 19],
                  [20, 21], [22, 23], [24], [25]]
MAPPING_1_TO_2 = [[0, 1], [2, 3], [4, 5], [6, 7, 8], [9, 10, 11, 12], [13, 14], [15]]




# ---------------------------------------------------------------------------------------------------------
# The official formulas, as evaluate_mIoU.py writes them (loops; NaN where a denominator is zero)


def official_matrix(pairs) -> np.ndarray:
    """The script's add_to_confusion_matrix over (ground truth, prediction) pairs: 255 or > 26 counts as 26."""
    matrix = np.zeros((27, 27), dtype=np.int64)
    for truth, prediction in pairs:
        truth = np.where((truth == 255) | (truth > 26), 26, truth).astype(np.int64)
        prediction = np.where((prediction == 255) | (prediction > 26), 26, prediction).astype(np.int64)
        np.add.at(matrix, (truth.ravel(), prediction.ravel()), 1)
    return matrix


def eval_ious(mat: np.ndarray) -> np.ndarray:
    ious = np.zeros(26)
    for label in range(26):
        tp = mat[label, label]
        fn = mat[label, :].sum() - tp
        fp = mat[[i for i in range(26) if i != label], label].sum()
        denominator = tp + fp + fn
        ious[label] = tp / denominator if denominator else np.nan
    return ious


def higher_level_mat(mat: np.ndarray, mapping) -> np.ndarray:
    out = np.zeros((len(mapping), len(mapping)), dtype=np.int64)
    for x in range(len(mapping)):
        for y in range(len(mapping)):
            out[x, y] = sum(mat[a, b] for a in mapping[x] for b in mapping[y])
    return out


def generalized_eval_ious(mat: np.ndarray) -> np.ndarray:
    ious = np.zeros(len(mat))
    for label in range(len(mat)):
        tp = mat[label, label]
        fn = mat[label, :].sum() - tp
        fp = mat[[i for i in range(len(mat)) if i != label], label].sum()
        denominator = tp + fp + fn
        ious[label] = tp / denominator if denominator else np.nan
    return ious


def correct_level1_groups() -> list[list[int]]:
    """Level-3 ids of each level-1 group: the official level-1 -> level-2 groups over the level-2 -> level-3 ones."""
    return [[l3 for l2 in level2_ids for l3 in MAPPING_2_TO_3[l2]] for level2_ids in MAPPING_1_TO_2]


def nullable(values) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


# ---------------------------------------------------------------------------------------------------------
# Unit tests of the formulas


def test_level3_rules_misc_prediction_is_a_miss_misc_truth_never_a_false_hit():
    matrix = np.zeros((27, 27), dtype=np.int64)
    matrix[0, 0], matrix[0, 26] = 6, 2  # road: 6 hits, 2 predicted as misc (255)
    matrix[26, 0] = 50  # ignored ground truth predicted as road: never a false positive
    matrix[1, 0], matrix[1, 1] = 2, 3  # drivable fallback: 2 taken for road
    iou = protocol.official_level3_iou(matrix)
    assert iou[0] == pytest.approx(6 / (6 + 2 + 2)) and iou[1] == pytest.approx(3 / 5)
    np.testing.assert_array_equal(iou, eval_ious(matrix))
    # Every other class has a zero denominator: the official mIoU is NaN, the mean over present classes is not.
    block = protocol.protocol_results(matrix, 720)["level3"]
    assert block["mean_iou"] is None and np.isnan(protocol.official_mean(iou))
    assert block["mean_iou_present_classes"] == pytest.approx((0.6 + 0.6) / 2)
    assert block["classes_without_pixels"] == list(LEVEL3_NAMES[2:])
    assert block["per_class_iou"]["road"] == pytest.approx(0.6) and block["per_class_iou"]["sky"] is None
    # Level 2 drops misc: road's two misc predictions are no miss there.
    level2 = protocol.official_level2_iou(matrix)
    np.testing.assert_array_equal(level2, generalized_eval_ious(higher_level_mat(matrix, MAPPING_2_TO_3)))
    assert level2[0] == pytest.approx(6 / 8)


def test_nan_rule_with_every_class_present():
    matrix = np.diag(np.arange(1, 28)).astype(np.int64)
    results = protocol.protocol_results(matrix, 720)
    for level in ("level3", "level2", "level1", "level1_official_script"):
        assert results[level]["mean_iou"] == 1.0 == results[level]["mean_iou_present_classes"]
        assert results[level]["classes_without_pixels"] == []
    matrix[7] = matrix[:, 7] = 0  # no bicycle anywhere
    results = protocol.protocol_results(matrix, 720)
    assert results["level3"]["mean_iou"] is None and results["level3"]["classes_without_pixels"] == ["bicycle"]
    assert results["level2"]["mean_iou"] == 1.0  # 2-wheeler still holds motorcycles


def test_level1_folds_by_the_label_table_not_as_the_official_script():
    matrix = np.zeros((27, 27), dtype=np.int64)
    car, motorcycle, sky, fence = (LEVEL3_NAMES.index(n) for n in ("car", "motorcycle", "sky", "fence"))
    matrix[car, motorcycle] = 10  # a car taken for a motorcycle: still a vehicle
    matrix[sky, sky] = 5
    matrix[fence, fence] = 4
    ours = protocol.level1_iou(matrix)
    np.testing.assert_array_equal(ours, generalized_eval_ious(higher_level_mat(matrix, correct_level1_groups())))
    vehicles, sky_group, road_side = 3, 6, 4
    assert ours[vehicles] == 1.0 and ours[sky_group] == 1.0 and ours[road_side] == 1.0  # fence is road-side
    script = protocol.official_script_level1_iou(matrix)
    np.testing.assert_array_equal(script, generalized_eval_ious(higher_level_mat(matrix, MAPPING_1_TO_2)))
    # The script reads car (9) as level-2 id 9, a road-side object, fence (15) as sky, and drops sky (25).
    assert script[vehicles] == 0.0 and script[road_side] == 0.0 and script[sky_group] == 1.0
    results = protocol.protocol_results(matrix, 720)
    assert results["level1_official_script"]["groups"]["vehicles"] == ["motorcycle", "bicycle", "autorickshaw"]
    assert results["level1"]["per_class_iou"]["vehicles"] == 1.0
    assert results["level1_official_script"]["per_class_iou"]["vehicles"] == 0.0


def test_on_frames_of_the_protocol_size_level3_equals_the_native_iou():
    rng = np.random.default_rng(0)
    native, official = StreamingConfusionMatrix(26), protocol.IddProtocolConfusion(RESOLUTION)
    for _ in range(3):
        truth = rng.integers(0, 26, (FRAME[1], FRAME[0]), dtype=np.uint8)
        truth[rng.random(truth.shape) < 0.2] = 255
        prediction = np.where(rng.random(truth.shape) < 0.7, truth % 255, rng.integers(0, 26, truth.shape)) % 26
        native.update(torch.from_numpy(prediction.astype(np.uint8)), truth)
        official.update(torch.from_numpy(prediction.astype(np.uint8)), truth)
    np.testing.assert_array_equal(official.matrix[:26, :26], native.matrix)
    np.testing.assert_allclose(protocol.official_level3_iou(official.matrix), per_category_iou(native.matrix))


def test_resize_is_pil_nearest_and_rejects_bad_maps():
    label = np.arange(90 * 160, dtype=np.int64).reshape(90, 160) % 251
    resized = protocol.resize_to_frame(label, FRAME)
    expected = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(FRAME, resample=Image.NEAREST))
    assert resized.shape == (240, 426) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, expected)
    with pytest.raises(ValueError, match="outside"):
        protocol.resize_to_frame(label + 300, FRAME)
    with pytest.raises(ValueError, match="one of"):
        protocol.protocol_frame(360)


def test_card_entries_name_the_protocol_and_never_replace_the_native_ones(tmp_path):
    def results(native: float, official: float, resolution: int) -> dict:
        block = protocol.protocol_results(np.diag(np.arange(1, 28)).astype(np.int64), resolution)
        block["level3"]["mean_iou"] = official
        return {"mean_iou": native, "idd_protocol": block}

    entries = model_index_results(results(0.4, 0.3, 720), "validation", "idd", "IDD", "idd-level3")
    by_name = {entry.metric_name: entry for entry in entries}
    assert by_name["mIoU"].metric_value == 0.4 and by_name["mIoU"].metric_config is None
    official = by_name["mIoU (IDD official protocol, 1280x720)"]
    assert (official.metric_type, official.metric_value, official.metric_config) == (
        "mean_iou", 0.3, "idd-official-1280x720")
    assert {"mIoU level 2 (IDD official protocol, 1280x720)", "mIoU level 1 (IDD official protocol, 1280x720)"} <= set(
        by_name)
    card = tmp_path / "README.md"
    update_model_card_eval_results(card, entries, model_name="m")
    # A native-only evaluation replaces the native mIoU only; one at another resolution adds its own entries.
    native_only = EvalResult(task_type="image-segmentation", dataset_type="idd", dataset_name="IDD",
                             dataset_config="idd-level3", dataset_split="validation", metric_type="mean_iou",
                             metric_value=0.5)
    update_model_card_eval_results(card, [native_only], model_name="m")
    update_model_card_eval_results(card, model_index_results(results(0.5, 0.25, 480), "validation", "idd", "IDD",
                                                             "idd-level3"), model_name="m")
    written = ModelCard.load(card).data.eval_results
    values = {(r.metric_type, r.metric_config): r.metric_value for r in written if r.metric_type == "mean_iou"}
    assert values == {("mean_iou", None): 0.5, ("mean_iou", "idd-official-1280x720"): 0.3,
                      ("mean_iou", "idd-official-858x480"): 0.25}


# ---------------------------------------------------------------------------------------------------------
# run_eval.py --protocol idd end to end, on an IDD tree with frames of two sizes


@pytest.fixture(scope="module")
def two_size_tree(tmp_path_factory):
    """An IDD tree whose val split holds 90x160 and 180x320 frames, in two sequence folders."""
    root = tmp_path_factory.mktemp("two_sizes")
    for index, (sequence, size) in enumerate(SIZES.items()):
        part = tmp_path_factory.mktemp(sequence)
        generate_synthetic_idd(part, 3, 1, size, seed=index, split="val", workers=1)
        for kind in ("leftImg8bit", "gtFine"):
            (source,) = (part / kind / "val").iterdir()
            shutil.copytree(source, root / kind / "val" / sequence)
            for path in sorted((root / kind / "val" / sequence).iterdir()):
                path.rename(path.with_name(f"{sequence}_{path.name}"))
    return root


@pytest.fixture(scope="module")
def level3_model(tmp_path_factory, sharpened_tiny_model):
    """The sharpened tiny level-3 model (tests/conftest.py), saved with a small image processor."""
    folder = tmp_path_factory.mktemp("tiny_level3")
    sharpened_tiny_model.save_pretrained(folder)
    load_image_processor("tiny", shortest_edge=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def protocol_run(two_size_tree, level3_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol_eval")
    results = run_eval.main([
        "--model_name_or_path", str(level3_model), "--data_dir", str(two_size_tree), "--split", "validation",
        "--output_dir", str(out / "ev"), "--export_predictions", str(out / "preds"), "--protocol", "idd",
        "--protocol_resolution", str(RESOLUTION), "--num_overlays", "0", "--dataloader_num_workers", "0",
        "--batch_size", "3",
    ])
    return out, results


def _frames(tree: Path, preds: Path):
    """(ground truth, exported prediction) arrays of every frame, read from the files as the official script does."""
    for truth_file in sorted((tree / "gtFine" / "val").rglob("*_gtFine_labellevel3Ids.png")):
        pred_file = preds / truth_file.parent.name / truth_file.name
        yield Image.open(truth_file), Image.open(pred_file)


def test_protocol_idd_equals_the_official_formula_on_two_frame_sizes(protocol_run, two_size_tree):
    out, results = protocol_run
    native_pairs, official_pairs = [], []
    for truth, prediction in _frames(two_size_tree, out / "preds"):
        native_pairs.append((np.array(truth), np.array(prediction)))
        # process_pred_gt_pair: each map resized to the frame with PIL nearest when not already that size.
        official_pairs.append(tuple(np.array(image if image.size == FRAME else image.resize(FRAME, Image.NEAREST))
                                    for image in (truth, prediction)))
    assert {truth.shape for truth, _ in native_pairs} == set(SIZES.values()) and len(native_pairs) == 6
    matrix = official_matrix(official_pairs)
    block = results["idd_protocol"]
    assert results["protocol"] == "idd" and block["resolution"] == RESOLUTION
    assert block["frame"] == {"width": 426, "height": 240}
    assert np.array_equal(np.array(block["confusion_matrix"]), matrix)
    level3 = eval_ious(matrix)
    assert list(block["level3"]["per_class_iou"].values()) == nullable(level3)
    assert block["level3"]["mean_iou"] == (None if np.isnan(level3.mean()) else level3.mean())
    assert block["level3"]["mean_iou_present_classes"] == pytest.approx(np.nanmean(level3), abs=1e-12)
    level2 = generalized_eval_ious(higher_level_mat(matrix, MAPPING_2_TO_3))
    assert list(block["level2"]["per_class_iou"].values()) == nullable(level2)
    level1 = generalized_eval_ious(higher_level_mat(matrix, correct_level1_groups()))
    assert list(block["level1"]["per_class_iou"].values()) == nullable(level1)
    script_level1 = generalized_eval_ious(higher_level_mat(matrix, MAPPING_1_TO_2))
    assert list(block["level1_official_script"]["per_class_iou"].values()) == nullable(script_level1)

    # As expected against native scoring: every frame weighs the same (its 426x240 pixels, ignored ones as misc),
    # while natively a 180x320 frame weighs four times a 90x160 one; so the scores differ.
    assert matrix.sum() == block["counted_pixels"] == 6 * 426 * 240
    native = np.array(results["confusion_matrix"])
    assert native.sum() == sum(int((truth != 255).sum()) for truth, _ in native_pairs)
    native_iou = np.array([np.nan if row["iou"] is None else row["iou"] for row in results["per_class"]])
    present = ~np.isnan(native_iou) & ~np.isnan(level3)
    assert present.sum() >= 3 and not np.allclose(native_iou[present], level3[present])
    assert results["mean_iou"] != block["level3"]["mean_iou_present_classes"]

    report = (out / "ev" / "eval_report.md").read_text()
    assert "## IDD official protocol (426x240)" in report and "--res 240" in report
    assert report == render_report(json.loads((out / "ev" / "eval_results.json").read_text()))


def test_protocol_idd_refuses_a_model_that_is_not_level3(capsys, two_size_tree, tmp_path):
    with pytest.raises(SystemExit) as info:
        run_eval.main(["--model_name_or_path", "tiny", "--data_dir", str(two_size_tree), "--label_set", "idd-level2",
                       "--protocol", "idd", "--output_dir", str(tmp_path / "ev")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("run_eval.py: error: --protocol idd") and "idd-level2" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert [p.name for p in (tmp_path / "ev").iterdir()] == [LOCK_FILE]  # nothing scored, nothing written
