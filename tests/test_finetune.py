"""End-to-end tests of run_finetune.py on tiny synthetic scenes: outputs, learning, resume and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback, pipeline

import run_finetune
from roadseg_utils.data import DataSourceArguments, load_segmentation_dataset
from roadseg_utils.labels import IGNORE_INDEX, idd_label_set
from roadseg_utils.metrics import compute_segmentation_metrics
from roadseg_utils.synthetic import generate_synthetic_idd

REPO = Path(__file__).resolve().parents[1]
SPLIT_ARGS = ["--train_fraction", "0.7", "--val_fraction", "0.2", "--test_fraction", "0.1"]
QUIET = ["--dataloader_num_workers", "0", "--disable_tqdm", "True", "--report_to", "none"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """40 synthetic IDD frames of 90x160 (smaller than some crops used below)."""
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_idd(root, num_images=40, num_sequences=4, image_size=(90, 160), seed=3, workers=1)
    return root


def finetune(scenes: Path, output_dir: Path, *extra: str, callbacks=None) -> dict:
    """Run the script in this process on ``scenes`` from the packaged pretrained tiny model."""
    argv = ["--model_name_or_path", "tiny-cityscapes", "--data_dir", str(scenes), "--output_dir", str(output_dir),
            *SPLIT_ARGS, *QUIET, *extra]
    return run_finetune.main(argv, callbacks=callbacks)


def test_outputs_load_offline_in_a_pipeline(scenes, tmp_path):
    output_dir = tmp_path / "ft"
    # The 128x256 crop is larger than the 90x160 frames, so crops are padded.
    results = finetune(scenes, output_dir, "--max_steps", "3", "--per_device_train_batch_size", "2",
                       "--crop_size", "128x256", "--eval_strategy", "no")

    written = json.loads((output_dir / "all_results.json").read_text())
    assert written["train_runtime"] > 0 and written["train_samples_per_second"] > 0
    assert written["train_peak_cpu_rss_mb"] > 50
    assert written["eval_num_images"] == 8 and written["test_num_images"] == 4
    assert 0 <= written["eval_mean_iou"] <= 1 and 0 <= written["test_mean_iou"] <= 1
    assert written["eval_mean_iou"] == pytest.approx(results["eval_mean_iou"])
    splits = json.loads((output_dir / "data_splits.json").read_text())
    assert [len(splits["paths"][name]) for name in ("train", "validation", "test")] == [28, 8, 4]

    card = ModelCard.load(output_dir / "README.md")
    assert {"image-segmentation", "mask2former"} <= set(card.data.tags)
    index = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index[("validation", "mean_iou")] == pytest.approx(written["eval_mean_iou"], abs=1e-6)
    assert index[("test", "mean_iou")] == pytest.approx(written["test_mean_iou"], abs=1e-6)
    assert "model.pixel_level_module.encoder" in card.text and "learning_rate" in card.text
    # The head started from tiny-cityscapes' rows: autorickshaw from car, obs-str-bar-fallback random.
    assert "| autorickshaw | car |" in card.text and "| obs-str-bar-fallback | random |" in card.text
    assert "`tiny-cityscapes`" in card.text and card.data.base_model is None

    image = Image.open(next((scenes / "leftImg8bit").rglob("*.png")))
    segmenter = pipeline("image-segmentation", model=str(output_dir))
    segments = segmenter(image, subtask="semantic")
    names = set(idd_label_set(3).id2label.values())
    assert segments and all(s["label"] in names and s["mask"].size == image.size for s in segments)


def test_defaults_are_the_seed_baseline_and_a_json_file_is_the_whole_config(tmp_path):
    model_args, data_args, training_args = run_finetune.parse_arguments(["--output_dir", str(tmp_path / "a")])
    assert model_args.model_name_or_path == "facebook/mask2former-swin-small-cityscapes-semantic"
    assert model_args.frozen_parts == ("backbone", "pixel_decoder")
    assert (training_args.num_train_epochs, training_args.per_device_train_batch_size) == (2, 8)
    assert (training_args.learning_rate, training_args.weight_decay) == (5e-5, 0.0)
    assert training_args.optim == "adamw_torch" and training_args.lr_scheduler_type == "constant"
    assert (data_args.train_fraction, data_args.val_fraction, data_args.test_fraction) == (0.855, 0.045, 0.10)
    assert not training_args.remove_unused_columns and training_args.batch_eval_metrics

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_name_or_path": "tiny", "data_dir": "somewhere", "output_dir": "out",
                                  "crop_size": "64x128", "learning_rate": 1e-3, "unfreeze_backbone": True}))
    model_args, data_args, training_args = run_finetune.parse_arguments([str(config)])
    assert model_args.frozen_parts == ("pixel_decoder",)
    assert data_args.crop == (64, 128) and data_args.eval_edge == 64 and training_args.learning_rate == 1e-3
    with pytest.raises(run_finetune.CommandLineError, match="--crop_size"):
        run_finetune.parse_arguments(["--output_dir", "x", "--crop_size", "64by128"])


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """A selection manifest in the format of roadseg_utils.selection."""
    header = {"format": "roadseg-selection-manifest", "version": 1, "strategy": "weighted", "alpha": 0.4,
              "beta": 0.4, "gamma": 0.2, "num_images": sum(r["selected"] for r in rows),
              "num_candidates": len(rows), "rare_classes": [{"id": 19, "name": "traffic light"}],
              "label_set": {"name": "idd-level3"}, "dataset": {"fingerprint": "abc"}}
    path.write_text(json.dumps({"header": header, "rows": rows}))
    return path


def test_selection_manifest_restricts_training_to_selected_train_rows(scenes, tmp_path):
    paths = sorted(p.relative_to(scenes).as_posix() for p in scenes.rglob("*_leftImg8bit.png"))
    rows = [{"path": p, "sequence": p.split("/")[2], "cds": 1.0, "rcs": 1.0, "ics": 1.0, "score": 1.0 - i / 100,
             "rank": i + 1, "selected": i < 12} for i, p in enumerate(paths)]
    manifest = write_manifest(tmp_path / "manifest.json", rows)
    output_dir = tmp_path / "selected"
    results = finetune(scenes, output_dir, "--selection_manifest", str(manifest), "--max_steps", "1",
                       "--per_device_train_batch_size", "2", "--crop_size", "64x128", "--eval_strategy", "no",
                       "--do_eval", "False", "--do_predict", "False")
    splits = json.loads((output_dir / "data_splits.json").read_text())
    selected_in_train = set(paths[:12]) & set(splits["paths"]["train"])
    assert results["train_samples"] == splits["trained_on"] == len(selected_in_train) > 0
    card = (output_dir / "README.md").read_text()
    assert "selected images trained on" in card and "traffic light" in card

    foreign = write_manifest(tmp_path / "foreign.json", [{**rows[0], "path": "elsewhere/x.png"}])
    with pytest.raises(SystemExit):
        finetune(scenes, tmp_path / "foreign", "--selection_manifest", str(foreign), "--max_steps", "1")


def constant_prediction_miou(scenes: Path) -> float:
    """The best mIoU any single class predicted everywhere reaches on the validation maps."""
    args = DataSourceArguments(data_dir=str(scenes), train_fraction=0.7, val_fraction=0.2, test_fraction=0.1)
    validation = load_segmentation_dataset(args, idd_label_set(3), seed=42)["validation"]
    references = np.concatenate([np.asarray(row["label"]).ravel() for row in validation])
    labelled = references[references != IGNORE_INDEX]
    totals = np.bincount(labelled, minlength=26)
    best = 0.0
    for constant in range(26):
        confusion = np.zeros((26, 26), dtype=np.int64)
        confusion[:, constant] = totals
        best = max(best, compute_segmentation_metrics(confusion)["mean_iou"])
    return best


@pytest.fixture(scope="module")
def learned(scenes, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny model trained for 80 steps on ``scenes`` (without scale jitter, evaluated at the training scale),
    its output folder and results."""
    output_dir = tmp_path_factory.mktemp("learned") / "ft"
    # 90x160 frames cover a 64x128 crop at 72x128.
    results = finetune(scenes, output_dir, "--max_steps", "80", "--per_device_train_batch_size", "4",
                       "--crop_size", "64x128", "--min_scale", "1", "--max_scale", "1", "--eval_shortest_edge", "72",
                       "--learning_rate", "5e-3", "--eval_strategy", "no", "--save_strategy", "no", "--seed", "42")
    return output_dir, results


def test_tiny_model_learns_beyond_a_constant_prediction(scenes, learned):
    baseline = constant_prediction_miou(scenes)
    _, results = learned
    assert 0 < baseline < 0.05
    assert results["eval_mean_iou"] > 3 * baseline
    assert results["eval_mean_iou"] > baseline + 0.04


def miou_of_maps(predictions: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> float:
    """The mIoU of label maps keyed by image path, counted here from scratch."""
    assert predictions.keys() == references.keys()
    confusion = np.zeros((26, 26), dtype=np.int64)
    for path, reference in references.items():
        labelled = reference != IGNORE_INDEX
        np.add.at(confusion, (reference[labelled].astype(int), predictions[path][labelled].astype(int)), 1)
    return compute_segmentation_metrics(confusion)["mean_iou"]


def test_card_results_run_eval_pipeline_and_exports_score_the_test_split_alike(scenes, learned, tmp_path):
    import run_eval

    output_dir, results = learned
    test_rows = load_segmentation_dataset(
        DataSourceArguments(data_dir=str(scenes), train_fraction=0.7, val_fraction=0.2, test_fraction=0.1),
        idd_label_set(3), seed=42,
    )["test"]
    references = {row["path"]: np.asarray(row["label"]) for row in test_rows}
    images = {row["path"]: row["image"] for row in test_rows}
    assert len(references) == 4

    card = ModelCard.load(output_dir / "README.md")
    card_test = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "test"}
    written = json.loads((output_dir / "test_results.json").read_text())

    evaluated = run_eval.main(["--model_name_or_path", str(output_dir), "--data_dir", str(scenes), *SPLIT_ARGS,
                               "--output_dir", str(tmp_path / "ev"), "--export_predictions", str(tmp_path / "preds"),
                               "--num_overlays", "0", "--dataloader_num_workers", "0", "--batch_size", "3"])

    segmenter = pipeline("image-segmentation", model=str(output_dir))
    label2id = segmenter.model.config.label2id
    from_pipeline = {}
    for path, image in images.items():
        label_map = np.full(references[path].shape, 255, dtype=np.uint8)
        for segment in segmenter(image, subtask="semantic"):
            label_map[np.asarray(segment["mask"]) > 0] = label2id[segment["label"]]
        from_pipeline[path] = label_map
    exported = {
        path: np.asarray(Image.open(tmp_path / "preds" / Path(path).parent.name / Path(path).name.replace(
            "_leftImg8bit.png", "_gtFine_labellevel3Ids.png")))
        for path in references
    }

    scores = {
        "all_results.json": results["test_mean_iou"], "test_results.json": written["test_mean_iou"],
        "model card": card_test["mean_iou"], "run_eval.py": evaluated["mean_iou"],
        "pipeline()": miou_of_maps(from_pipeline, references), "exported PNGs": miou_of_maps(exported, references),
    }
    assert scores["run_eval.py"] > 0.05, scores  # a model that predicts more than one class
    for way, score in scores.items():
        assert score == pytest.approx(scores["all_results.json"], abs=1e-6), (way, scores)


class StopAfterFirstSave(TrainerCallback):
    """Stop training right after the first checkpoint is written, as a cut-off session would."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True
        return control


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(scenes, tmp_path):
    common = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--per_device_train_batch_size",
              "2", "--crop_size", "64x128", "--learning_rate", "1e-3", "--eval_strategy", "no", "--do_eval", "False",
              "--do_predict", "False", "--seed", "7"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    finetune(scenes, straight, *common)
    finetune(scenes, interrupted, *common, callbacks=[StopAfterFirstSave()])
    assert json.loads((interrupted / "trainer_state.json").read_text())["global_step"] == 3
    finetune(scenes, interrupted, *common)  # finds checkpoint-3 in the output folder and resumes from it

    assert json.loads((interrupted / "trainer_state.json").read_text())["global_step"] == 6
    expected, resumed = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    start = load_file(interrupted / "checkpoint-3" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert any(not torch.equal(start[name], resumed[name]) for name in resumed), "steps 4-6 changed nothing"
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name  # bitwise: same kernels, same order, same RNG states


def test_unknown_label_set_is_one_clear_error(scenes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune(scenes, tmp_path / "bad", "--label_set", "cityscapes")
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("run_finetune.py: error: unknown label set 'cityscapes'")


@pytest.mark.parametrize(("mapping", "problem"), [
    (None, "label mapping file not found"),
    ('{"autorickshaw": "tuk-tuk"}', "'tuk-tuk' (for 'autorickshaw') is not a class of the checkpoint"),
])
def test_bad_label_mapping_is_one_clear_error_before_training(scenes, tmp_path, capsys, mapping, problem):
    mapping_file = tmp_path / "mapping.json"
    if mapping is not None:
        mapping_file.write_text(mapping)
    with pytest.raises(SystemExit) as exit_info:
        finetune(scenes, tmp_path / "bad", "--label_mapping", str(mapping_file), "--max_steps", "1")
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("run_finetune.py: error: ") and problem in error[-1]
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_offline_hub_id_exits_with_one_line_and_no_traceback(scenes, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(REPO / "run_finetune.py"), "--model_name_or_path", "facebook/no-such-model-offline",
         "--data_dir", str(scenes), "--output_dir", str(tmp_path / "hub")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("run_finetune.py: error: cannot fetch 'facebook/no-such-model-offline'")


def test_no_logger_by_default_and_tensorboard_writes_events(scenes, tmp_path, monkeypatch, capsys):
    # transformers 4.57 would report to every installed logger (a preinstalled wandb would start logging).
    _, _, training_args = run_finetune.parse_arguments(["--output_dir", str(tmp_path / "a")])
    assert training_args.report_to == []

    finetune(scenes, tmp_path / "tb", "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no",
             "--do_eval", "False", "--do_predict", "False", "--report_to", "tensorboard", "--logging_steps", "1")
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "no tensorboard event file written"

    # Without the logger's package: one line naming the fix, before any work.
    monkeypatch.setattr(run_finetune, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(SystemExit) as exit_info:
        finetune(scenes, tmp_path / "no-tb", "--max_steps", "2", "--report_to", "tensorboard")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "run_finetune.py: error: --report_to tensorboard: its package is not installed (pip install tensorboard)")
    assert not (tmp_path / "no-tb").exists()


def test_hf_example_conventions_results_files_sample_caps_process_line_and_reuse_message(scenes, tmp_path, caplog):
    output_dir = tmp_path / "ft"
    common = ("--max_steps", "2", "--crop_size", "64x128", "--eval_strategy", "no", "--save_strategy", "no",
              "--max_train_samples", "5", "--max_eval_samples", "3")
    with caplog.at_level("INFO", logger="run_finetune"):
        results = finetune(scenes, output_dir, *common)

    # One file per stage, as Trainer.save_metrics writes them, and all of them in all_results.json.
    stages = {stage: json.loads((output_dir / f"{stage}_results.json").read_text())
              for stage in ("train", "eval", "test")}
    assert stages["train"]["train_samples"] == 5 and "train_runtime" in stages["train"]
    assert stages["eval"]["eval_num_images"] == 3 and all(key.startswith("eval_") or key == "epoch"
                                                           for key in stages["eval"])
    assert stages["test"]["test_num_images"] == 4
    every = json.loads((output_dir / "all_results.json").read_text())
    for metrics in stages.values():
        assert all(every[key] == pytest.approx(value) or value is None for key, value in metrics.items())
    assert every["test_mean_iou"] == pytest.approx(results["test_mean_iou"])
    splits = json.loads((output_dir / "data_splits.json").read_text())
    assert splits["trained_on"] == 5 and len(splits["paths"]["validation"]) == 3

    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Process rank: 0 of 1")]
    assert summary == ["Process rank: 0 of 1 (local rank -1), device: cpu, n_gpu: 0, distributed training: False, "
                       "16-bit training: no"]
    assert "already holds" not in caplog.text

    # A rerun in the folder, which has no checkpoint (--save_strategy no), says that it starts over.
    caplog.clear()
    with caplog.at_level("INFO", logger="run_finetune"):
        finetune(scenes, output_dir, *common)
    reused = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    assert len(reused) == 1 and "all_results.json" in reused[0] and "no checkpoint to resume from" in reused[0]


def test_hf_dataset_with_its_own_id2label_names_classes_in_card_and_eval_report(tmp_path):
    import datasets

    import run_eval

    folder = tmp_path / "lanes"
    rng = np.random.default_rng(0)
    rows = {"image": [], "annotation": []}
    for _ in range(12):
        rows["image"].append(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))
        rows["annotation"].append(Image.fromarray(rng.integers(0, 3, (48, 64), dtype=np.uint8)))
    datasets.Dataset.from_dict(
        rows, features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    ).save_to_disk(str(folder))
    names = {"0": "lane", "1": "kerb", "2": "verge"}
    (folder / "id2label.json").write_text(json.dumps(names))

    # Neither --label_set nor --label_column: the dataset's own names and its "annotation" column.
    run_finetune.main(["--model_name_or_path", "tiny", "--dataset_name", str(folder), "--output_dir",
                       str(tmp_path / "ft"), *SPLIT_ARGS, *QUIET, "--max_steps", "2", "--crop_size", "32x64",
                       "--eval_strategy", "no", "--save_strategy", "no"])
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["id2label"] == names
    card = (tmp_path / "ft" / "README.md").read_text()
    assert all(f"| {i} | {name} |" in card for i, name in enumerate(names.values()))

    results = run_eval.main(["--model_name_or_path", str(tmp_path / "ft"), "--dataset_name", str(folder),
                             *SPLIT_ARGS, "--output_dir", str(tmp_path / "ev"), "--num_overlays", "0",
                             "--dataloader_num_workers", "0"])
    assert results["class_names"] == list(names.values()) and results["label_set"] == "lanes"
    report = (tmp_path / "ev" / "eval_report.md").read_text()
    assert all(name in report for name in names.values())


@pytest.mark.parametrize("color_jitter_prob", ["0", "1"])
def test_colour_jitter_and_loss_settings_reach_training_config_and_card(scenes, tmp_path, color_jitter_prob):
    seen: dict = {}

    class FirstBatch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            seen["batch"] = next(iter(train_dataloader))
            seen["criterion"] = (model.criterion.num_points, model.criterion.empty_weight[-1].item())

    output_dir = tmp_path / "ft"
    # Crops the size of the 90x160 frames at scale 1: without colour jitter a crop is an image or its mirror.
    finetune(scenes, output_dir, "--max_steps", "1", "--per_device_train_batch_size", "4", "--crop_size", "90x160",
             "--min_scale", "1", "--max_scale", "1", "--color_jitter_prob", color_jitter_prob,
             "--loss_overrides", "train_num_points=77,no_object_weight=0.25", "--eval_strategy", "no",
             "--do_eval", "False", "--do_predict", "False", "--save_strategy", "no", callbacks=[FirstBatch()])
    assert seen["criterion"] == (77, pytest.approx(0.25))
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["train_num_points"], config["no_object_weight"]) == (77, 0.25)
    card = (output_dir / "README.md").read_text()
    assert f"color_jitter_prob | {float(color_jitter_prob)}" in card.replace("`", "")
    assert "loss train_num_points | 77" in card.replace("`", "")

    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    mean, std = np.array(processor["image_mean"]), np.array(processor["image_std"])
    originals = [np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
                 for path in sorted((scenes / "leftImg8bit").rglob("*.png"))]
    untouched = 0
    for pixel_values in seen["batch"]["pixel_values"].double().numpy():
        image = (pixel_values.transpose(1, 2, 0) * std + mean) * 255
        untouched += any(np.abs(image - view).max() < 1e-3 for original in originals
                         for view in (original, original[:, ::-1]))
    assert untouched == (4 if color_jitter_prob == "0" else 0)
