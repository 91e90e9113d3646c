"""Selection from a model's predictions (histograms, uncertainty, embeddings), its cache, and the diversity strategy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import run_selection
from roadseg_utils.data import DataSourceArguments, UnreadableImageError
from roadseg_utils.labels import get_label_set, idd_label_set
from roadseg_utils.selection import (
    PREDICTION_CACHE,
    SelectionArguments,
    SelectionError,
    check_model_labels,
    compute_class_stats,
    compute_model_scores,
    k_center_greedy,
    load_candidate_pool,
    select_images,
)
from roadseg_utils.selection import model_scores as model_scores_module
from roadseg_utils.synthetic import generate_synthetic_idd

LABEL_SET = idd_label_set(3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate_synthetic_idd(root, 24, 3, "90x160", seed=0)
    return root


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory, sharpened_tiny_model: torch.nn.Module) -> Path:
    """A trained-looking tiny model saved as a checkpoint folder (the sharpened heads stand in for fine-tuning)."""
    folder = tmp_path_factory.mktemp("model")
    sharpened_tiny_model.save_pretrained(folder)
    return folder


class LabelEcho(torch.nn.Module):
    """A test double that predicts each image's label map exactly: one query per label value 0-255, whose mask is
    the label map at the input's size (pool order, so images must come in the order given)."""

    def __init__(self, label_maps: list[np.ndarray]) -> None:
        super().__init__()
        self.label_maps = list(label_maps)
        self.calls = 0

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        batch, _, height, width = pixel_values.shape
        labels = torch.zeros(batch, height, width, dtype=torch.long)
        for i in range(batch):
            label = torch.from_numpy(self.label_maps.pop(0).astype(np.int64))
            labels[i, : label.shape[0], : label.shape[1]] = label
        masks = torch.where(torch.nn.functional.one_hot(labels, 256).permute(0, 3, 1, 2).bool(), 20.0, -20.0)
        classes = torch.full((batch, 256, 257), -20.0)
        classes[:, torch.arange(256), torch.arange(256)] = 20.0
        features = pixel_values.mean(1, keepdim=True).repeat(1, 4, 1, 1)[:, :, ::8, ::8]
        return SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks,
                               encoder_last_hidden_state=features)


def _label_maps(pool) -> list[np.ndarray]:
    from PIL import Image

    return [np.array(Image.open(record.label_path)) for record in pool.records]


def test_model_histograms_equal_label_histograms_and_rankings(tree: Path, tmp_path: Path, one_torch_thread) -> None:
    """A model that returns the label map gives the label histograms and the same ranking (acceptance 2)."""
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(tree)), LABEL_SET)
    labels = compute_class_stats(pool, LABEL_SET, progress=False)
    double = LabelEcho(_label_maps(pool))
    # Shortest edge 90 is the images' own, so the double's maps line up with the labels pixel for pixel.
    scores = compute_model_scores(pool, LABEL_SET, "echo", tmp_path, lambda: double, batch_size=5,
                                  prediction_size=90)
    np.testing.assert_array_equal(scores.stats.histograms, labels.histograms)
    args = SelectionArguments(output_dir=str(tmp_path), num_images=8)
    from_labels = select_images(labels, args, LABEL_SET)
    from_model = select_images(scores.stats, args, LABEL_SET, uncertainty=scores.uncertainty,
                               embeddings=scores.embeddings)
    np.testing.assert_array_equal(from_model.rank, from_labels.rank)
    np.testing.assert_array_equal(from_model.score, from_labels.score)
    # A certain model: one class per pixel with probability ~1, so the entropy is ~0.
    assert scores.uncertainty.max() < 1e-3


def test_cached_rerun_loads_no_model(tree: Path, tmp_path: Path, sharpened_tiny_model, one_torch_thread) -> None:
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(tree)), LABEL_SET)
    first = compute_model_scores(pool, LABEL_SET, "m", tmp_path, lambda: sharpened_tiny_model, batch_size=8,
                                 prediction_size=64)
    assert first.inferred == len(pool) and (tmp_path / PREDICTION_CACHE).is_file()

    def must_not_load() -> torch.nn.Module:
        raise AssertionError("the model was loaded although every prediction is cached")

    again = compute_model_scores(pool, LABEL_SET, "m", tmp_path, must_not_load, batch_size=8, prediction_size=64)
    assert again.inferred == 0
    np.testing.assert_array_equal(again.stats.histograms, first.stats.histograms)
    np.testing.assert_allclose(again.embeddings, first.embeddings)
    # The tiny model is not certain: a positive entropy that differs between images.
    assert first.uncertainty.min() > 0 and first.uncertainty.std() > 0
    # Another prediction size is another fingerprint: inferred again.
    other = compute_model_scores(pool, LABEL_SET, "m", tmp_path, lambda: sharpened_tiny_model, batch_size=8,
                                 prediction_size=32)
    assert other.inferred == len(pool)


def test_interrupted_pass_resumes_from_its_cache(tree: Path, tmp_path: Path, sharpened_tiny_model,
                                                 monkeypatch: pytest.MonkeyPatch, one_torch_thread) -> None:
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(tree)), LABEL_SET)
    monkeypatch.setattr(model_scores_module, "SAVE_EVERY", 1)

    class Interrupting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def forward(self, **inputs):  # noqa: ANN003, ANN202
            self.batches += 1
            if self.batches == 3:
                raise KeyboardInterrupt
            return sharpened_tiny_model(**inputs)

    with pytest.raises(KeyboardInterrupt):
        compute_model_scores(pool, LABEL_SET, "m", tmp_path, Interrupting, batch_size=4, prediction_size=64)
    resumed = compute_model_scores(pool, LABEL_SET, "m", tmp_path, lambda: sharpened_tiny_model, batch_size=4,
                                   prediction_size=64)
    assert resumed.inferred == len(pool) - 8  # two batches of 4 were saved before the interruption
    assert not list(tmp_path.glob("model_predictions.part*.npz"))  # merged into the one cache file


def test_unreadable_image_is_named_or_skipped(tree: Path, tmp_path: Path, sharpened_tiny_model,
                                              one_torch_thread) -> None:
    copy = tmp_path / "tree"
    shutil.copytree(tree / "leftImg8bit", copy / "leftImg8bit")
    bad = sorted((copy / "leftImg8bit" / "train").rglob("*.png"))[3]
    bad.write_bytes(b"not an image")
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(copy)), LABEL_SET, require_labels=False)
    with pytest.raises(UnreadableImageError, match=bad.name):
        compute_model_scores(pool, LABEL_SET, "m", tmp_path / "c", lambda: sharpened_tiny_model, prediction_size=32)
    kept = compute_model_scores(pool, LABEL_SET, "m", tmp_path / "c", lambda: sharpened_tiny_model,
                                prediction_size=32, on_bad_sample="skip")
    assert len(kept.stats.pool) == len(pool) - 1 and [name for name, _ in kept.stats.skipped] == [str(bad)]
    # The problem is cached with the predictions: a rerun loads no model, and reports the image the same way.
    again = compute_model_scores(pool, LABEL_SET, "m", tmp_path / "c", lambda: None, prediction_size=32,
                                 on_bad_sample="skip")
    assert again.inferred == 0 and [name for name, _ in again.stats.skipped] == [str(bad)]
    with pytest.raises(UnreadableImageError, match=bad.name):
        compute_model_scores(pool, LABEL_SET, "m", tmp_path / "c", lambda: None, prediction_size=32)


def test_selection_without_masks_writes_manifest_report_and_plots(tree: Path, model_folder: Path, tmp_path: Path,
                                                                  one_torch_thread) -> None:
    """Acceptance 1: the gtFine folder deleted, --label_source model with a trained tiny model."""
    unlabelled = tmp_path / "tree"
    shutil.copytree(tree / "leftImg8bit", unlabelled / "leftImg8bit")
    out = tmp_path / "out"
    outputs = run_selection.main(["--data_dir", str(unlabelled), "--label_source", "model", "--model_name_or_path",
                                  str(model_folder), "--num_images", "6", "--output_dir", str(out),
                                  "--prediction_size", "64", "--delta", "0.3"])
    header = json.loads((out / "manifest.json").read_text())["header"]
    assert header["label_source"] == "model" and header["model"]["name"] == str(model_folder)
    assert len(header["model"]["fingerprint"]) == 16 and header["delta"] == 0.3
    assert "uncertainty" in header["formula"]
    assert sum(row["selected"] for row in json.loads((out / "manifest.json").read_text())["rows"]) == 6
    report = (out / "report.md").read_text()
    assert str(model_folder) in report and "diversity" not in report.split("## Strategies")[0]
    assert all(path.is_file() for path in outputs["plots"]) and outputs["plots"]


def test_image_folder_without_masks(tree: Path, model_folder: Path, tmp_path: Path, one_torch_thread) -> None:
    outputs = run_selection.main(["--image_dir", str(tree / "leftImg8bit" / "train"), "--label_source", "model",
                                  "--model_name_or_path", str(model_folder), "--num_images", "5", "--output_dir",
                                  str(tmp_path / "out"), "--prediction_size", "32", "--strategy", "diversity",
                                  "--no_plots"])
    rows = json.loads(outputs["manifest"].read_text())["rows"]
    assert len(rows) == 24 and sum(row["selected"] for row in rows) == 5


def test_model_with_other_labels_is_one_line(model_folder: Path, tree: Path, tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="labels differ from --label_set idd-level1"):
        check_model_labels(str(model_folder), get_label_set("idd-level1"))
    check_model_labels(str(model_folder), LABEL_SET)
    # A model whose config is only seen once it is loaded (a Hub id) is checked then, before any inference.
    from roadseg_utils.modeling import load_model

    pool = load_candidate_pool(DataSourceArguments(data_dir=str(tree)), LABEL_SET)
    with pytest.raises(SelectionError, match="26 classes, 7 expected"):
        compute_model_scores(pool, get_label_set("idd-level1"), "hub/model", tmp_path,
                             lambda: load_model("tiny", LABEL_SET))


def test_diversity_picks_distinct_images_from_both_clusters() -> None:
    """Acceptance 3: 90 + 10 points in two well-separated clusters, K = 10."""
    rng = np.random.default_rng(0)
    embeddings = np.concatenate([rng.normal(0, 1, (90, 16)), rng.normal(50, 1, (10, 16))])
    for seed in range(5):
        picks = k_center_greedy(embeddings, 10, seed)
        assert len(set(picks.tolist())) == 10
        assert (picks < 90).any() and (picks >= 90).any()
        np.testing.assert_array_equal(picks, k_center_greedy(embeddings, 10, seed))  # deterministic for a seed
    started = k_center_greedy(embeddings, 10, 0, start=[5, 7])
    assert started[:2].tolist() == [5, 7] and len(set(started.tolist())) == 10


def test_diversity_on_duplicates_still_picks_k_distinct() -> None:
    embeddings = np.repeat(np.eye(3), 4, axis=0)  # 3 distinct points, 4 copies each
    picks = k_center_greedy(embeddings, 7, 0)
    assert len(set(picks.tolist())) == 7
    assert len({tuple(embeddings[i]) for i in picks[:3]}) == 3  # the 3 distinct points come first


def test_uncertainty_weight_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="need --model_name_or_path"):
        SelectionArguments(output_dir=str(tmp_path), delta=0.5)
    with pytest.raises(SelectionError, match="need --model_name_or_path"):
        SelectionArguments(output_dir=str(tmp_path), strategy="diversity")


def test_hf_dataset_without_label_column(tree: Path, sharpened_tiny_model, tmp_path: Path, one_torch_thread) -> None:
    """A saved dataset holding only image bytes: ranked by the model, each row's key the dataset's own path."""
    import datasets

    files = sorted((tree / "leftImg8bit" / "train").rglob("*.png"))
    images = [{"bytes": f.read_bytes(), "path": None} for f in files]
    paths = [f"frame{i:03d}" for i in range(len(files))]
    dataset = datasets.Dataset.from_dict({"image": images, "path": paths},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "path": datasets.Value("string")}))
    dataset.save_to_disk(str(tmp_path / "ds"))
    pool = load_candidate_pool(DataSourceArguments(dataset_name=str(tmp_path / "ds")), LABEL_SET,
                               require_labels=False)
    scores = compute_model_scores(pool, LABEL_SET, "m", tmp_path / "c", lambda: sharpened_tiny_model,
                                  prediction_size=32)
    records = load_candidate_pool(DataSourceArguments(data_dir=str(tree)), LABEL_SET, require_labels=False)
    from_files = compute_model_scores(records, LABEL_SET, "m", tmp_path / "c2", lambda: sharpened_tiny_model,
                                      prediction_size=32)
    assert scores.stats.pool.paths == paths
    np.testing.assert_array_equal(scores.stats.histograms, from_files.stats.histograms)
    again = compute_model_scores(pool, LABEL_SET, "m", tmp_path / "c", lambda: None, prediction_size=32)
    assert again.inferred == 0


def test_two_processes_share_the_model_pass(tree: Path, model_folder: Path, tmp_path: Path) -> None:
    """Under accelerate launch (2 gloo CPU processes) each infers half the pool; the outputs equal one process's."""
    import os
    import socket
    import subprocess
    import sys

    unlabelled = tmp_path / "tree"
    shutil.copytree(tree / "leftImg8bit", unlabelled / "leftImg8bit")
    args = ["--data_dir", str(unlabelled), "--label_source", "model", "--model_name_or_path", str(model_folder),
            "--num_images", "6", "--prediction_size", "32", "--strategy", "diversity", "--no_plots"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "run_selection.py", *args, "--output_dir", str(tmp_path / "two")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launch, cwd=Path(run_selection.__file__).parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 run through the model here" in done.stderr  # the main process inferred its half
    # One process with a cache of its own runs the whole pool through the model.
    run_selection.main([*args, "--output_dir", str(tmp_path / "one"), "--label_cache_dir", str(tmp_path / "one_cache")])
    rows = [json.loads((tmp_path / name / "manifest.json").read_text())["rows"] for name in ("two", "one")]
    assert rows[0] == rows[1]
    shared_cache = unlabelled / ".roadseg_cache"
    assert (shared_cache / "model_predictions.npz").is_file()
    assert not list(shared_cache.glob("model_predictions.part*.npz"))  # merged into the one cache file


def test_report_places_the_strategy_in_the_study(tree: Path, tmp_path: Path) -> None:
    rows = [{"strategy": name, "runs": runs, "miou_mean": mean, "miou_std": std, "rare_iou_mean": 0.1,
             "train_seconds": 10.0} for name, runs, mean, std in
            (("random", 3, 0.30, 0.02), ("weighted", 1, 0.25, 0.0), ("all", 1, 0.40, 0.0))]
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"budget": 8, "pool_size": 24, "results": rows}))
    run_selection.main(["--data_dir", str(tree), "--num_images", "8", "--output_dir", str(tmp_path / "out"),
                        "--study_results", str(study), "--no_plots"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| weighted (this run's strategy) | 1 | 0.2500 ± 0.0000 |" in report
    assert ("**weighted** ranks 3 of 3 by test mIoU; -0.0500 against random, below random's seed-to-seed "
            "spread") in report
    study.write_text("[]")
    with pytest.raises(SystemExit, match="not a study"):
        run_selection.main(["--data_dir", str(tree), "--num_images", "8", "--output_dir", str(tmp_path / "out"),
                            "--study_results", str(study)])


def test_uncertainty_term_is_zero_at_delta_zero() -> None:
    from roadseg_utils.selection import weighted_score

    rng = np.random.default_rng(0)
    cds, rcs, ics, uncertainty = (rng.random(50) for _ in range(4))
    three = weighted_score(cds, rcs, ics, 0.4, 0.4, 0.2)
    np.testing.assert_array_equal(weighted_score(cds, rcs, ics, 0.4, 0.4, 0.2, uncertainty, 0.0), three)
    four = weighted_score(cds, rcs, ics, 0.4, 0.4, 0.2, uncertainty, 0.5)
    np.testing.assert_allclose(four - three, 0.5 * uncertainty / uncertainty.max())
    with pytest.raises(SelectionError, match="no uncertainty"):
        weighted_score(cds, rcs, ics, 0.4, 0.4, 0.2, None, 0.5)
