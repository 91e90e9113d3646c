"""Tests for roadseg_utils.selection and run_selection.py: scores, strategies, cache, manifest, report, subsets."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_selection
from roadseg_utils import selection
from roadseg_utils.data import (
    DataSourceArguments,
    LabelValueError,
    UnreadableMaskError,
    dataset_column,
    find_records,
    label_cache,
    load_segmentation_dataset,
    read_label_map,
    records_to_dataset,
)
from roadseg_utils.labels import get_label_set
from roadseg_utils.selection import (
    CandidatePool,
    SelectionArguments,
    SelectionError,
    class_diversity,
    class_presence,
    compute_class_stats,
    export,
    image_frequency,
    label_map_counts,
    load_candidate_pool,
    load_manifest,
    rare_class_sampling_order,
    rare_class_score,
    resolve_budget,
    selected_paths,
    sequence_score,
    weighted_score,
)
from roadseg_utils.synthetic import generate_synthetic_idd

LEVEL3 = get_label_set("idd-level3")
SYNTHETIC_IMAGES = 300
BUDGET = 100


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _write_idd_tree(root: Path, labels: dict[tuple[str, str], np.ndarray], split: str = "train") -> None:
    """IDD tree with one frame per (sequence, frame) key and its label-id PNG."""
    for (sequence, frame), label in labels.items():
        height, width = label.shape
        _save(root / "leftImg8bit" / split / sequence / f"{frame}_leftImg8bit.png",
              np.full((height, width, 3), 90, np.uint8))
        _save(root / "gtFine" / split / sequence / f"{frame}_gtFine_labellevel3Ids.png", label.astype(np.uint8))


def _blocks(counts: dict[int, int], size: int = 16) -> np.ndarray:
    """A 4x4 label map holding ``counts[value]`` pixels of each value."""
    values = [value for value, count in counts.items() for _ in range(count)]
    assert len(values) == size
    return np.array(values, dtype=np.uint8).reshape(4, 4)


# Four hand-made frames: classes 0-3 with known pixel counts, in sequences "a" (3 frames) and "b" (1 frame).
HAND_MADE = {
    ("a", "f1"): {0: 8, 1: 8},
    ("a", "f2"): {0: 16},
    ("a", "f3"): {0: 4, 1: 4, 2: 4, 255: 4},
    ("b", "f4"): {0: 12, 3: 4},
}


@pytest.fixture()
def hand_made(tmp_path: Path) -> Path:
    _write_idd_tree(tmp_path / "hand", {key: _blocks(counts) for key, counts in HAND_MADE.items()})
    return tmp_path / "hand"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selection") / "syn"
    generate_synthetic_idd(root, SYNTHETIC_IMAGES, 12, (90, 160), seed=0)
    return root


@pytest.fixture(scope="module")
def default_run(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("selection_runs") / "sel"
    run_selection.main(["--data_dir", str(synthetic), "--num_images", str(BUDGET), "--output_dir", str(output)])
    return output


def _rows_by_path(manifest: Path) -> dict[str, dict]:
    return {row["path"]: row for row in load_manifest(manifest)[1]}


# ---------------------------------------------------------------------------------------------------------
# Scores against hand-computed values


def test_scores_match_hand_computed_values(hand_made: Path, tmp_path: Path):
    output = tmp_path / "out"
    run_selection.main(["--data_dir", str(hand_made), "--num_images", "2", "--output_dir", str(output),
                        "--rare_threshold", "0.3", "--no_plots"])
    rows = _rows_by_path(output / "manifest.json")
    path = "leftImg8bit/train/{}/{}_leftImg8bit.png".format
    # Image frequencies: class 0 in 4/4 images, class 1 in 2/4, classes 2 and 3 in 1/4 -> rare set {2, 3}.
    expected = {
        path("a", "f1"): (math.log(2), 0.0, 1 / 3),  # entropy of (1/2, 1/2); no rare class; 1 / 3 frames
        path("a", "f2"): (0.0, 0.0, 1 / 3),
        path("a", "f3"): (math.log(3), 1.0, 1 / 3),  # the ignore pixels do not count
        path("b", "f4"): (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 1.0, 1.0),
    }
    top = {name: max(v[i] for v in expected.values()) for i, name in enumerate(("cds", "rcs", "ics"))}
    for key, (cds, rcs, ics) in expected.items():
        row = rows[key]
        assert (row["cds"], row["rcs"], row["ics"]) == pytest.approx((cds, rcs, ics))
        score = 0.4 * cds / top["cds"] + 0.4 * rcs / top["rcs"] + 0.2 * ics / top["ics"]
        assert row["score"] == pytest.approx(score)
    assert {p for p, r in rows.items() if r["selected"]} == {path("b", "f4"), path("a", "f3")}
    header, _ = load_manifest(output / "manifest.json")
    assert [c["id"] for c in header["rare_classes"]] == [2, 3]


def test_seed_modes_match_hand_computed_values():
    histograms = np.zeros((4, 256), dtype=np.int64)
    for row, counts in enumerate(HAND_MADE.values()):
        for value, count in counts.items():
            histograms[row, value] = count
    presence = class_presence(histograms, LEVEL3.num_labels)
    frequency = image_frequency(presence)
    assert frequency[:4].tolist() == [1.0, 0.5, 0.25, 0.25]
    assert class_diversity(histograms, LEVEL3.num_labels, mode="count").tolist() == [2, 1, 3, 2]
    neglog = rare_class_score(presence, frequency, "neglog")
    assert neglog == pytest.approx([math.log(2), 0.0, math.log(2) + math.log(4), math.log(4)])
    assert rare_class_score(presence, frequency, "count", [1, 3]).tolist() == [1, 0, 1, 1]
    sizes = sequence_score(["a", "a", "a", "b"], "count")
    assert sizes.tolist() == [3, 3, 3, 1]
    score = weighted_score(class_diversity(histograms, LEVEL3.num_labels, mode="count"), neglog, sizes, 0.4, 0.4, 0.2)
    assert score[2] == pytest.approx(0.4 * 3 / 3 + 0.4 * 1.0 + 0.2 * 3 / 3)
    assert score[3] == pytest.approx(0.4 * 2 / 3 + 0.4 * math.log(4) / math.log(8) + 0.2 * 1 / 3)
    # With 5 pixels needed, frame f3 (4 pixels per class) holds no class at all.
    assert class_diversity(histograms, LEVEL3.num_labels, min_pixels=5, mode="count").tolist() == [2, 1, 0, 1]
    assert weighted_score(np.zeros(4), np.zeros(4), sizes, 1, 1, 0).tolist() == [0, 0, 0, 0]


def test_label_map_counts_hold_the_histogram_and_shape_of_every_label_format(tmp_path: Path):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 26, (30, 40)).astype(np.uint8)
    label[:3] = 255
    _save(tmp_path / "l.png", label)
    palette = Image.fromarray(label, "L").convert("P")
    palette.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
    palette.save(tmp_path / "p.png")
    Image.fromarray(label.astype(np.uint16)).save(tmp_path / "i16.png")
    polygons = {"imgHeight": 20, "imgWidth": 30, "objects": [
        {"label": "road", "polygon": [[0, 10], [29, 10], [29, 19], [0, 19]]},
        {"label": "car", "polygon": [[5, 12], [12, 12], [12, 17], [5, 17]]},
    ]}
    (tmp_path / "x_gtFine_polygons.json").write_text(json.dumps(polygons))
    for name in ("l.png", "p.png", "i16.png", "x_gtFine_polygons.json"):
        label_map = read_label_map(tmp_path / name, 3)
        histogram, shape = label_map_counts(tmp_path / name, 3)
        assert np.array_equal(histogram, np.bincount(label_map.ravel(), minlength=256)), name
        assert shape == label_map.shape, name


def test_truncated_greyscale_png_is_an_unreadable_mask(tmp_path: Path):
    rng = np.random.default_rng(2)
    _save(tmp_path / "image.png", np.zeros((64, 80, 3), np.uint8))
    _save(tmp_path / "whole.png", rng.integers(0, 26, (64, 80)).astype(np.uint8))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    [(outcome, stamp)] = label_cache.file_verdicts([(str(tmp_path / "image.png"), str(tmp_path / "cut.png"))], 3)
    assert outcome.histogram is None and outcome.error is UnreadableMaskError
    assert str(tmp_path / "cut.png") in outcome.problem
    assert stamp is not None  # a file that does not decode stays bad until it changes, so the verdict is cached


# ---------------------------------------------------------------------------------------------------------
# The acceptance runs on the synthetic set


def test_default_run_writes_outputs_and_selects_exactly_the_top_k(default_run: Path):
    for name in ("manifest.json", "manifest.csv", "report.md"):
        assert (default_run / name).is_file()
    assert len(list(default_run.glob("*.png"))) >= 2
    header, rows = load_manifest(default_run / "manifest.json")
    assert len(rows) == SYNTHETIC_IMAGES and header["num_images"] == BUDGET
    columns = {name: np.array([row[name] for row in rows]) for name in ("cds", "rcs", "ics", "score")}
    recomputed = sum(header[w] * columns[c] / columns[c].max()
                     for w, c in (("alpha", "cds"), ("beta", "rcs"), ("gamma", "ics")))
    assert np.allclose(recomputed, columns["score"], rtol=0, atol=1e-12)
    order = sorted(range(len(rows)), key=lambda i: (-round(recomputed[i], 12), rows[i]["path"]))
    assert {rows[i]["path"] for i in order[:BUDGET]} == {row["path"] for row in rows if row["selected"]}
    assert sorted(row["rank"] for row in rows) == list(range(1, SYNTHETIC_IMAGES + 1))
    csv_header, csv_rows = load_manifest(default_run / "manifest.csv")
    assert csv_header == header and csv_rows == rows
    report = (default_run / "report.md").read_text()
    assert f"| images | {SYNTHETIC_IMAGES} | {BUDGET} |" in report
    sequence_rows = report.split("## Images per sequence")[1].split("## Plots")[0].strip().splitlines()[2:]
    counts = [row.strip("|").split("|") for row in sequence_rows]
    assert sum(int(c[1]) for c in counts) == SYNTHETIC_IMAGES and sum(int(c[2]) for c in counts) == BUDGET


def test_weighted_subset_beats_random_for_every_rare_class(synthetic: Path, default_run: Path):
    header, rows = load_manifest(default_run / "manifest.json")
    records = {r.path: r for r in find_records(DataSourceArguments(data_dir=str(synthetic)))}
    paths = sorted(records)
    # Presence recomputed from the decoded label maps, independently of the selection's histograms.
    presence = np.stack([
        np.bincount(read_label_map(records[p].label_path).ravel(), minlength=256)[: LEVEL3.num_labels] > 0
        for p in paths
    ])
    frequency = presence.mean(axis=0)
    rare = np.flatnonzero((frequency > 0) & (frequency < 0.1))
    assert [c["id"] for c in header["rare_classes"]] == rare.tolist() and len(rare) >= 3
    chosen = {row["path"] for row in rows if row["selected"]}
    weighted_share = presence[[p in chosen for p in paths]].mean(axis=0)
    random_subset = np.random.default_rng((0, selection.RANDOM_SALT)).permutation(len(paths))[:BUDGET]
    random_share = presence[random_subset].mean(axis=0)
    for c in rare:
        assert weighted_share[c] > random_share[c], LEVEL3.id2label[c]
    report = (default_run / "report.md").read_text()
    assert f"weighted holds a larger share than random for {len(rare)} of {len(rare)} rare classes." in report
    for c in rare:
        assert f"| {LEVEL3.id2label[c]} | {frequency[c]:.1%} | {weighted_share[c]:.1%} | {random_share[c]:.1%} |" \
            in report


def test_rerun_with_other_weights_decodes_no_label_map(synthetic: Path, default_run: Path, monkeypatch, tmp_path):
    output = tmp_path / "rerun"
    shutil.copytree(default_run, output)
    decoded = []
    real_open = Image.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and ("gtFine" in os.fspath(file) or "leftImg8bit" in os.fspath(file)):
            decoded.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)
    monkeypatch.setattr(label_cache, "label_map_counts", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    # Nor is any image's header read: the cache holds each sample's verdict.
    monkeypatch.setattr(label_cache, "image_size", lambda *a, **k: decoded.append(a) or pytest.fail("image read"))
    outputs = run_selection.main(["--data_dir", str(synthetic), "--num_images", str(BUDGET), "--output_dir",
                                  str(output), "--alpha", "0", "--beta", "1", "--gamma", "0", "--num_workers", "1"])
    assert decoded == [] and outputs["decoded"] == 0
    header, rows = load_manifest(output / "manifest.json")
    assert (header["alpha"], header["beta"], header["gamma"]) == (0.0, 1.0, 0.0)
    rcs = np.array([row["rcs"] for row in rows])
    assert np.allclose([row["score"] for row in rows], rcs / rcs.max())


def test_changed_label_file_is_the_only_one_decoded_again(hand_made: Path, tmp_path: Path, monkeypatch):
    args = ["--data_dir", str(hand_made), "--num_images", "2", "--output_dir", str(tmp_path / "o"), "--no_plots",
            "--rare_threshold", "0.6"]
    assert run_selection.main(args)["decoded"] == 4
    assert _rows_by_path(tmp_path / "o" / "manifest.json")["leftImg8bit/train/a/f2_leftImg8bit.png"]["rcs"] == 0.0
    changed = hand_made / "gtFine/train/a/f2_gtFine_labellevel3Ids.png"
    _save(changed, _blocks({0: 8, 3: 8}))
    os.utime(changed, ns=(1, 1))
    decoded = []
    real = label_cache.label_map_counts
    monkeypatch.setattr(label_cache, "label_map_counts", lambda path, level: decoded.append(path) or real(path, level))
    assert run_selection.main(args)["decoded"] == 1
    assert [os.fspath(p) for p in decoded] == [str(changed)]
    assert _rows_by_path(tmp_path / "o" / "manifest.json")["leftImg8bit/train/a/f2_leftImg8bit.png"]["rcs"] == 1.0


def _cached_run(synthetic: Path, default_run: Path, output: Path, strategy: str, seed: str) -> Path:
    """Select 60 images into ``output``; the default run filled the tree's label cache, so nothing is decoded."""
    run_selection.main(["--data_dir", str(synthetic), "--num_images", "60", "--output_dir", str(output),
                        "--strategy", strategy, "--seed", seed, "--no_plots"])
    return output


@pytest.mark.parametrize("strategy", ["weighted", "random", "rare_class_sampling"])
def test_same_seed_gives_byte_identical_manifests(synthetic: Path, default_run: Path, tmp_path: Path, strategy):
    outputs = [_cached_run(synthetic, default_run, tmp_path / name, strategy, "3") for name in ("one", "two")]
    for name in ("manifest.json", "manifest.csv", "report.md"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes()
    header, rows = load_manifest(outputs[0] / "manifest.json")
    assert header["strategy"] == strategy and sum(row["selected"] for row in rows) == 60


def test_other_seed_changes_the_random_subset(synthetic: Path, default_run: Path, tmp_path: Path):
    chosen = [
        selected_paths(_cached_run(synthetic, default_run, tmp_path / seed, "random", seed) / "manifest.json")
        for seed in ("0", "1")
    ]
    assert len(chosen[0]) == len(chosen[1]) == 60 and chosen[0] != chosen[1]


def test_parallel_statistics_equal_serial_ones(synthetic: Path):
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(synthetic)), LEVEL3)
    serial = compute_class_stats(pool, LEVEL3, num_workers=1, progress=False)
    parallel = compute_class_stats(pool, LEVEL3, num_workers=2, progress=False)
    assert serial.decoded == parallel.decoded == SYNTHETIC_IMAGES
    assert np.array_equal(serial.histograms, parallel.histograms)


def test_dataset_pool_statistics_in_parallel_equal_the_files_ones(synthetic: Path):
    file_pool = load_candidate_pool(DataSourceArguments(data_dir=str(synthetic)), LEVEL3)
    from_files = compute_class_stats(file_pool, LEVEL3, num_workers=1, progress=False)
    dataset = records_to_dataset(file_pool.records[:80], LEVEL3)
    pool = CandidatePool(file_pool.paths[:80], file_pool.sequences[:80], "records", dataset=dataset)
    parallel = compute_class_stats(pool, LEVEL3, num_workers=2, progress=False)
    assert np.array_equal(parallel.histograms, from_files.histograms[:80])


def test_selected_paths_match_the_train_split_path_column(synthetic: Path, default_run: Path):
    args = DataSourceArguments(data_dir=str(synthetic), train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    train_paths = dataset_column(load_segmentation_dataset(args)["train"], "path")
    chosen = selected_paths(default_run / "manifest.csv")
    assert len(chosen) == BUDGET and chosen <= set(train_paths)


# ---------------------------------------------------------------------------------------------------------
# Strategies


def test_rare_class_sampling_is_seeded_prefix_stable_and_starts_with_the_rarest_class():
    rng = np.random.default_rng(0)
    presence = rng.random((200, 6)) < np.array([0.9, 0.6, 0.4, 0.2, 0.05, 0.0])
    presence[:5, :] = False  # images without any class come last
    presence[5:, 0] = True
    frequency = presence.mean(axis=0)
    full = rare_class_sampling_order(presence, frequency, 0.01, seed=4)
    assert sorted(full.tolist()) == list(range(200))
    assert set(full[-5:].tolist()) == set(range(5))
    assert np.array_equal(rare_class_sampling_order(presence, frequency, 0.01, seed=4, count=37), full[:37])
    assert not np.array_equal(rare_class_sampling_order(presence, frequency, 0.01, seed=5), full)
    rarest = int(presence[:, 4].sum())
    assert presence[full[:rarest], 4].all()


def test_budget_rules():
    assert resolve_budget(300, 100) == 100
    assert resolve_budget(300, fraction=0.25) == 75
    assert resolve_budget(300, fraction=1.0) == 300 and resolve_budget(300, fraction=0.001) == 1
    assert resolve_budget(2000) == 1500
    with pytest.raises(SelectionError, match="asked for 500 images but the dataset has 300"):
        resolve_budget(300, 500)
    with pytest.raises(SelectionError, match="not both"):
        resolve_budget(300, 10, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Errors from the command line: one line, non-zero exit, no traceback


@pytest.mark.parametrize("weights, message", [
    (["--alpha", "-0.1"], "weights must be finite and >= 0, got alpha=-0.1"),
    (["--alpha", "0", "--beta", "0", "--gamma", "0"], "at least one weight must be positive"),
    (["--num_images", "5", "--fraction", "0.5"], "not both"),
])
def test_bad_options_are_one_line_usage_errors(hand_made: Path, tmp_path: Path, capsys, weights, message):
    with pytest.raises(SystemExit) as excinfo:
        run_selection.main(["--data_dir", str(hand_made), "--output_dir", str(tmp_path / "o"), *weights])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_budget_larger_than_the_pool_names_both_numbers(synthetic: Path, default_run: Path, tmp_path: Path):
    output = tmp_path / "o"
    with pytest.raises(SystemExit) as excinfo:
        run_selection.main(["--data_dir", str(synthetic), "--num_images", "500", "--output_dir", str(output)])
    assert str(excinfo.value.code).startswith("error: asked for 500 images but the dataset has 300")
    with pytest.raises(SystemExit) as excinfo:  # the default budget is 1500
        run_selection.main(["--data_dir", str(synthetic), "--output_dir", str(output)])
    assert "asked for 1500 images but the dataset has 300" in str(excinfo.value.code)


def test_rare_classes_by_name_and_unknown_name(hand_made: Path, tmp_path: Path):
    output = tmp_path / "o"
    run_selection.main(["--data_dir", str(hand_made), "--num_images", "1", "--output_dir", str(output),
                        "--rare_classes", "sidewalk", "1", "--no_plots"])
    header, rows = load_manifest(output / "manifest.json")
    assert [c["name"] for c in header["rare_classes"]] == ["drivable fallback", "sidewalk"]
    assert header["rare_set"] == "named"
    assert _rows_by_path(output / "manifest.json")["leftImg8bit/train/a/f3_leftImg8bit.png"]["rcs"] == 2.0
    with pytest.raises(SystemExit) as excinfo:
        run_selection.main(["--data_dir", str(hand_made), "--num_images", "1", "--output_dir", str(output),
                            "--rare_classes", "unicorn", "--no_plots"])
    assert "unknown rare class 'unicorn'" in str(excinfo.value.code) and "\n" not in str(excinfo.value.code)


def test_label_values_outside_the_label_set_name_the_file(hand_made: Path, tmp_path: Path, caplog):
    bad = hand_made / "gtFine/train/a/f2_gtFine_labellevel3Ids.png"
    _save(bad, _blocks({0: 12, 30: 4}))
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(hand_made)), LEVEL3)
    with pytest.raises(LabelValueError, match=f"mask {bad} holds label values 30 outside idd-level3"):
        compute_class_stats(pool, LEVEL3, tmp_path / "c.npz", progress=False)
    with pytest.raises(SystemExit) as excinfo:
        run_selection.main(["--data_dir", str(hand_made), "--num_images", "1", "--output_dir", str(tmp_path / "o")])
    assert str(bad) in str(excinfo.value.code)
    stats = compute_class_stats(pool, LEVEL3, tmp_path / "c.npz", on_bad_sample="skip", progress=False)
    assert len(stats.pool) == 3 and "f2" not in " ".join(stats.pool.paths) and len(stats.skipped) == 1


def test_arguments_from_one_json_file(hand_made: Path, tmp_path: Path):
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"data_dir": str(hand_made), "output_dir": str(tmp_path / "o"), "num_images": 2,
                                  "strategy": "random", "plots": False}))
    outputs = run_selection.main([str(config)])
    assert outputs["num_selected"] == 2 and load_manifest(outputs["manifest"])[0]["strategy"] == "random"


def test_help_documents_every_score(capsys):
    with pytest.raises(SystemExit):
        run_selection.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("CDS:", "RCS:", "ICS:", "exp((1 - f_c) / T)", "--materialize", "--rare_threshold"):
        assert phrase in text


# ---------------------------------------------------------------------------------------------------------
# Materialising the subset


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small") / "syn"
    generate_synthetic_idd(root, 24, 3, (24, 40), seed=1, workers=1)
    return root


@pytest.mark.parametrize("mode", ["symlink", "copy"])
def test_materialized_tree_loads_back_with_exactly_k_images(small_synthetic: Path, tmp_path: Path, mode):
    output = tmp_path / "o"
    run_selection.main(["--data_dir", str(small_synthetic), "--num_images", "7", "--output_dir", str(output),
                        "--materialize", mode, "--no_plots"])
    subset = output / "subset"
    chosen = selected_paths(output / "manifest.json")
    records = find_records(DataSourceArguments(data_dir=str(subset)))
    assert {r.path for r in records} == chosen and len(records) == 7
    for record in records:
        frame = Path(record.label_path).name.split("_gtFine_")[0]
        assert Path(record.label_path).with_name(f"{frame}_gtFine_polygons.json").is_file()
        original = small_synthetic / Path(record.label_path).relative_to(subset)
        assert np.array_equal(read_label_map(record.label_path), read_label_map(original))
        assert Path(record.image_path).is_symlink() == (mode == "symlink")
    # A rerun replaces the earlier subset as a whole.
    run_selection.main(["--data_dir", str(small_synthetic), "--num_images", "3", "--output_dir", str(output),
                        "--materialize", mode, "--no_plots"])
    assert len(find_records(DataSourceArguments(data_dir=str(subset)))) == 3


def test_materialize_refuses_a_folder_it_did_not_write(small_synthetic: Path, tmp_path: Path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as excinfo:
        run_selection.main(["--data_dir", str(small_synthetic), "--num_images", "3", "--output_dir",
                            str(tmp_path / "o"), "--materialize", "copy", "--materialize_dir", str(target),
                            "--no_plots"])
    assert "is not a subset written by run_selection.py" in str(excinfo.value.code)
    assert (target / "notes.txt").read_text() == "keep me"


def test_hf_dataset_subset_loads_back_and_can_be_ranked_again(small_synthetic: Path, tmp_path: Path):
    output = tmp_path / "o"
    run_selection.main(["--data_dir", str(small_synthetic), "--num_images", "6", "--output_dir", str(output),
                        "--materialize", "hf_dataset", "--no_plots"])
    chosen = selected_paths(output / "manifest.json")
    args = DataSourceArguments(dataset_name=str(output / "subset"), train_fraction=1.0, val_fraction=0.0,
                               test_fraction=0.0)
    train = load_segmentation_dataset(args)["train"]
    assert len(train) == 6 and set(dataset_column(train, "path")) == chosen
    records = {r.path: r for r in find_records(DataSourceArguments(data_dir=str(small_synthetic)))}
    for row in train:
        assert np.array_equal(row["label"], read_label_map(records[row["path"]].label_path))
        assert row["image"].size == Image.open(records[row["path"]].image_path).size
    # The datasets folder is itself a data source: the same six rows, ranked from their decoded labels.
    again = tmp_path / "again"
    outputs = run_selection.main(["--dataset_name", str(output / "subset"), "--num_images", "2", "--output_dir",
                                  str(again), "--no_plots"])
    assert outputs["num_candidates"] == 6 and outputs["decoded"] == 6
    first = _rows_by_path(output / "manifest.json")
    for path, row in _rows_by_path(again / "manifest.json").items():
        assert row["cds"] == pytest.approx(first[path]["cds"])
    assert run_selection.main(["--dataset_name", str(output / "subset"), "--num_images", "2", "--output_dir",
                               str(again), "--no_plots"])["decoded"] == 0


def test_push_to_hub_offline_is_one_clear_line(small_synthetic: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(export.hub, "hub_is_reachable", lambda *a, **k: False)
    output = tmp_path / "o"
    with pytest.raises(SystemExit) as excinfo:
        run_selection.main(["--data_dir", str(small_synthetic), "--num_images", "3", "--output_dir", str(output),
                            "--push_to_hub", "--hub_dataset_id", "someone/subset", "--no_plots"])
    message = str(excinfo.value.code)
    assert message.startswith("error: cannot reach the Hugging Face Hub") and "\n" not in message
    assert (output / "subset" / "dataset_dict.json").is_file()


def test_push_to_hub_needs_a_repository(small_synthetic: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        run_selection.main(["--data_dir", str(small_synthetic), "--output_dir", str(tmp_path), "--push_to_hub"])
    assert "--push_to_hub needs --hub_dataset_id" in capsys.readouterr().err


def test_selection_arguments_validate_themselves():
    with pytest.raises(SelectionError, match="temperature must be > 0"):
        SelectionArguments(output_dir="o", temperature=0)
    with pytest.raises(SelectionError, match="rare_threshold"):
        SelectionArguments(output_dir="o", rare_threshold=1.5)
    pool = CandidatePool(["a"], ["s"], "src")
    assert len(pool.subset([0])) == 1


# ---------------------------------------------------------------------------------------------------------
# The selection charts


def _color_mask(picture: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (picture == np.asarray(color, dtype=np.uint8)).all(axis=-1)


def test_class_frequency_chart_draws_each_share_to_scale(tmp_path: Path):
    from roadseg_utils import visualize

    pool = np.array([0.25, 0.5, 0.0])
    subset = np.array([1.0, 0.75, 0.1])
    path = visualize.plot_class_frequency(["road", "car", "pole"], pool, subset, [2], tmp_path / "c.png")
    picture = np.asarray(Image.open(path).convert("RGB"))
    gray_rows = [row for row in _color_mask(picture, visualize.POOL_COLOR) if row.any()]
    blue_rows = [row for row in _color_mask(picture, visualize.SELECTED_COLOR) if row.any()]
    full_length = max(row.sum() for row in blue_rows)  # the 100 % bar of class 0
    gray_lengths = sorted({int(row.sum()) for row in gray_rows})
    blue_lengths = sorted({int(row.sum()) for row in blue_rows})
    # Two legend swatches (13 px) besides the bars.
    assert [round(length / full_length, 2) for length in gray_lengths if length > 13] == [0.25, 0.5]
    assert [round(length / full_length, 2) for length in blue_lengths if length > 13] == [0.1, 0.75, 1.0]
    # The rare class's name is red; without rare classes nothing is.
    assert _color_mask(picture, visualize.RARE_COLOR).any()
    plain = visualize.plot_class_frequency(["road", "car", "pole"], pool, subset, [], tmp_path / "plain.png")
    assert not _color_mask(np.asarray(Image.open(plain).convert("RGB")), visualize.RARE_COLOR).any()


def test_score_chart_puts_selected_images_right_of_the_cutoff(tmp_path: Path):
    from roadseg_utils import visualize

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.uniform(0.0, 0.4, 80), rng.uniform(0.6, 1.0, 20)])
    selected = scores > 0.5
    path = visualize.plot_score_distribution(scores, selected, tmp_path / "s.png", cutoff=0.5)
    picture = np.asarray(Image.open(path).convert("RGB"))
    legend_left = picture.shape[1] - 250
    gray_columns = np.flatnonzero(_color_mask(picture[:, :legend_left], visualize.POOL_COLOR).any(axis=0))
    blue_columns = np.flatnonzero(_color_mask(picture[:, :legend_left], visualize.SELECTED_COLOR).any(axis=0))
    red_columns = np.flatnonzero(_color_mask(picture[:, :legend_left], visualize.RARE_COLOR).any(axis=0))
    assert gray_columns.size and blue_columns.size and red_columns.size
    assert gray_columns.max() < red_columns.min() <= red_columns.max() < blue_columns.min()
