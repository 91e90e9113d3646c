"""run_eval.py end to end on synthetic scenes: outputs, IDD-format export, TTA, bad input, model card, thin classes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from roadseg_utils import eval_loop, evaluation, hub, inference, visualize
from roadseg_utils.card import FinetuneCardInfo, update_model_card_eval_results, write_finetune_card
from roadseg_utils.data import DataSourceArguments, dataset_column, load_segmentation_dataset
from roadseg_utils.labels import RAW_LABELS, idd_label_set
from roadseg_utils.modeling import load_image_processor, load_model
from roadseg_utils.output_dir import LOCK_FILE
from roadseg_utils.synthetic import generate_synthetic_idd

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_eval.py"
SEED = 42  # run_eval.py's default --seed, hence the split it scores
NUM_IMAGES, HEIGHT, WIDTH = 30, 90, 160
PROCESSOR_EDGE = 128
LEVEL3 = idd_label_set(3)


def _load_script():
    spec = importlib.util.spec_from_file_location("run_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run_eval = _load_script()


def independent_confusion(pairs, num_labels: int) -> np.ndarray:
    """A confusion matrix by np.add.at over (ground truth, prediction) pairs, not via roadseg_utils.metrics."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    for truth, prediction in pairs:
        keep = truth != 255
        np.add.at(matrix, (truth[keep].astype(np.int64), prediction[keep].astype(np.int64)), 1)
    return matrix


def independent_iou(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - np.diag(matrix)
    iou = np.array([hits[c] / union[c] if union[c] else np.nan for c in range(len(union))])
    return iou, float(np.mean(iou[~np.isnan(iou)]))


def level2_of_level3() -> np.ndarray:
    """Level-3 -> level-2 ids read off the official label table rows (255 stays 255)."""
    table = np.full(256, 255, dtype=np.uint8)
    for row in RAW_LABELS:
        if row.level3 != 255:
            table[row.level3] = row.level2
    return table


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_synthetic_idd(root, NUM_IMAGES, 3, (HEIGHT, WIDTH), seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sharpened_tiny_model):
    """The sharpened tiny model (tests/conftest.py), saved with a small image processor."""
    folder = tmp_path_factory.mktemp("tiny_model")
    sharpened_tiny_model.save_pretrained(folder)
    # A small processor size keeps the default --eval_shortest_edge (the checkpoint's) quick on a CPU.
    load_image_processor("tiny", shortest_edge=PROCESSOR_EDGE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli_run(syn_dir, model_dir, tmp_path_factory):
    """One run of the command line of acceptance 2, plus IDD export and the model-card update."""
    out = tmp_path_factory.mktemp("eval")
    command = [
        sys.executable, str(SCRIPT), "--model_name_or_path", str(model_dir), "--data_dir", str(syn_dir),
        "--output_dir", str(out / "ev"), "--export_predictions", str(out / "preds"), "--update_model_card",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "ev" / "eval_results.json").read_text())
    return out, results


@pytest.fixture(scope="module")
def test_split(syn_dir):
    """The test split the data layer builds for these arguments and seed, read independently of run_eval."""
    dataset = load_segmentation_dataset(DataSourceArguments(data_dir=str(syn_dir)), LEVEL3, SEED)["test"]
    return dataset, dataset_column(dataset, "path"), dataset_column(dataset, "sequence")


def _frame(path: str) -> str:
    return Path(path).name.replace("_leftImg8bit.png", "")


def _truth(syn_dir: Path, path: str, sequence: str) -> np.ndarray:
    split_folder = Path(path).parts[1]
    mask = syn_dir / "gtFine" / split_folder / sequence / f"{_frame(path)}_gtFine_labellevel3Ids.png"
    return np.array(Image.open(mask))


def test_cli_writes_every_output_with_expected_sizes(cli_run, test_split):
    out, results = cli_run
    dataset, paths, _ = test_split
    ev = out / "ev"
    for name in ("eval_results.json", "eval_report.md", "confusion_matrix.png", "per_class_iou.png"):
        assert (ev / name).is_file(), name
    assert results["num_images"] == len(dataset) > 0 and results["split"] == "test" and results["seed"] == SEED
    assert results["eval_shortest_edge"] == PROCESSOR_EDGE and results["tta"] == "none"  # the checkpoint processor's
    assert [row["name"] for row in results["per_class"]] == list(LEVEL3.id2label.values())
    assert {"mean_iou", "mean_iou_level2", "mean_iou_level1", "overall_accuracy", "frequency_weighted_iou"} <= set(
        results
    )
    assert sum(row["pixels"] for row in results["per_class"]) == np.array(results["confusion_matrix"]).sum()

    with Image.open(ev / "confusion_matrix.png") as picture:
        width, height = visualize.confusion_matrix_figsize(26)
        assert picture.size == (round(width * 100), round(height * 100))
    with Image.open(ev / "per_class_iou.png") as picture:
        width, height = visualize.iou_chart_figsize(26)
        assert picture.size == (round(width * 100), round(height * 100))

    overlays = sorted((ev / "overlays").iterdir())
    chosen = evaluation.overlay_indices(len(paths), 8)
    assert [p.name for p in overlays] == [f"{rank:03d}_{_frame(paths[i])}.png" for rank, i in enumerate(chosen)]
    for overlay in overlays:
        with Image.open(overlay) as picture:
            assert picture.width == 3 * WIDTH + 2 * visualize.OVERLAY_GAP
            assert picture.height > visualize.OVERLAY_HEADER + HEIGHT + visualize.LEGEND_ROW

    report = (ev / "eval_report.md").read_text()
    for row in results["per_class"]:
        iou = "—" if row["iou"] is None else f"{100 * row['iou']:.2f}"
        assert f"| {row['id']} | {row['name']} | {iou} |" in report


def test_exported_predictions_score_to_the_reported_miou(cli_run, syn_dir, test_split):
    out, results = cli_run
    _, paths, sequences = test_split
    written = sorted(p.relative_to(out / "preds").as_posix() for p in (out / "preds").rglob("*") if p.is_file())
    expected = sorted(f"{s}/{_frame(p)}_gtFine_labellevel3Ids.png" for p, s in zip(paths, sequences, strict=True))
    # The test split is carved from train: the ground truth of exactly its frames comes along, under the same names.
    assert written == sorted(["README.md", *expected, *(f"ground_truth/{name}" for name in expected)])
    pairs = []
    for path, sequence in zip(paths, sequences, strict=True):
        with Image.open(out / "preds" / sequence / f"{_frame(path)}_gtFine_labellevel3Ids.png") as picture:
            assert picture.mode == "L"
            prediction = np.array(picture)
        truth = _truth(syn_dir, path, sequence)
        exported_truth = np.array(Image.open(out / "preds" / "ground_truth" / sequence /
                                             f"{_frame(path)}_gtFine_labellevel3Ids.png"))
        np.testing.assert_array_equal(exported_truth, truth)
        assert prediction.shape == truth.shape == (HEIGHT, WIDTH)
        pairs.append((truth, prediction))
    readme = (out / "preds" / "README.md").read_text()
    assert (f"python evaluation/evaluate_mIoU.py --gts {(out / 'preds' / 'ground_truth').resolve()} "
            f"--preds {(out / 'preds').resolve()} --num-workers 8") in readme
    matrix = independent_confusion(pairs, 26)
    iou, mean_iou = independent_iou(matrix)
    assert len(np.unique(np.concatenate([p.ravel() for _, p in pairs]))) >= 3  # the predictions are not trivial
    assert mean_iou == results["mean_iou"]
    assert [None if np.isnan(v) else v for v in iou] == [row["iou"] for row in results["per_class"]]
    coarse = level2_of_level3()
    _, mean_iou_level2 = independent_iou(independent_confusion([(coarse[t], coarse[p]) for t, p in pairs], 16))
    assert mean_iou_level2 == results["mean_iou_level2"]


def test_overlay_panels_show_image_truth_and_prediction(cli_run, syn_dir, test_split):
    out, _ = cli_run
    _, paths, sequences = test_split
    index = evaluation.overlay_indices(len(paths), 8)[0]
    path, sequence = paths[index], sequences[index]
    with Image.open(out / "ev" / "overlays" / f"000_{_frame(path)}.png") as picture:
        overlay = np.array(picture.convert("RGB"))
    image = np.array(Image.open(syn_dir / path).convert("RGB"))
    truth = _truth(syn_dir, path, sequence)
    prediction = np.array(Image.open(out / "preds" / sequence / f"{_frame(path)}_gtFine_labellevel3Ids.png"))
    top = visualize.OVERLAY_HEADER
    for panel, expected in enumerate((image, LEVEL3.palette[truth], LEVEL3.palette[prediction])):
        left = panel * (WIDTH + visualize.OVERLAY_GAP)
        np.testing.assert_array_equal(overlay[top: top + HEIGHT, left: left + WIDTH], expected)


def test_model_card_gets_model_index_results(cli_run, model_dir):
    _, results = cli_run
    card = ModelCard.load(model_dir / "README.md")
    parsed = model_index_to_eval_results(metadata_load(model_dir / "README.md")["model-index"])[1]
    assert parsed and card.data.eval_results
    by_metric = {r.metric_type: r for r in parsed}
    assert by_metric["mean_iou"].metric_value == pytest.approx(results["mean_iou"], abs=1e-6)
    assert by_metric["mean_iou_level2"].metric_value == pytest.approx(results["mean_iou_level2"], abs=1e-6)
    assert {(r.task_type, r.dataset_type, r.dataset_split, r.dataset_config) for r in parsed} == {
        ("image-segmentation", "idd", "test", "idd-level3")
    }
    # A second evaluation of the same split replaces its results instead of adding duplicates.
    copy = model_dir.parent / "card_copy" / "README.md"
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(model_dir / "README.md", copy)
    newer = EvalResult(task_type="image-segmentation", dataset_type=parsed[0].dataset_type,
                       dataset_name=parsed[0].dataset_name, dataset_config="idd-level3", dataset_split="test",
                       metric_type="mean_iou", metric_value=0.5)
    update_model_card_eval_results(copy, [newer], model_name="unused")
    again = ModelCard.load(copy).data.eval_results
    assert len(again) == len(parsed) and [r.metric_value for r in again if r.metric_type == "mean_iou"] == [0.5]


def test_results_join_a_fine_tuning_card_without_losing_its_content(tmp_path):
    card_path = write_finetune_card(tmp_path, FinetuneCardInfo(
        model_name="me/roadseg", label_set=LEVEL3, metrics={"validation": {"mean_iou": 0.25, "overall_accuracy": 0.5}}
    ))
    body = ModelCard.load(card_path).text
    test_result = EvalResult(task_type="image-segmentation", dataset_type="idd", dataset_name="IDD",
                             dataset_config="idd-level3", dataset_split="test", metric_type="mean_iou",
                             metric_value=0.2)
    update_model_card_eval_results(card_path, [test_result], model_name="ignored")
    card = ModelCard.load(card_path)
    assert card.text == body and card.data.model_name == "me/roadseg"
    assert sorted((r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("test", "mean_iou", 0.2), ("validation", "mean_iou", 0.25), ("validation", "overall_accuracy", 0.5)
    ]


def test_push_uploads_in_one_commit_and_never_shows_the_token(tmp_path, monkeypatch):
    token = "hf_secretTOKEN123"
    files = {"README.md": tmp_path / "README.md", "eval/test/eval_results.json": tmp_path / "eval_results.json"}
    for path in files.values():
        path.write_text("x")
    calls = []
    monkeypatch.setattr(hub, "hub_is_reachable", lambda: True)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)))

    def create_commit(self, repo_id, operations, commit_message, **kw):
        calls.append(("commit", repo_id, sorted(op.path_in_repo for op in operations), commit_message, self.token))
        return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    url = hub.push_files_to_hub("me/model", files, token=token, commit_message="Evaluation on test", private=True)
    assert url == "https://hub/me/model/commit/1"
    assert calls == [("repo", "me/model", {"private": True, "exist_ok": True}),
                     ("commit", "me/model", sorted(files), "Evaluation on test", token)]

    def failing_commit(self, *args, **kw):
        response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/models/me/model"))
        raise HfHubHTTPError(f"401 Unauthorized for token {token}\nmore", response=response)

    monkeypatch.setattr(HfApi, "create_commit", failing_commit)
    with pytest.raises(hub.HubPublishError) as info:
        hub.push_files_to_hub("me/model", files, token=token)
    assert token not in str(info.value) and "\n" not in str(info.value) and "401" in str(info.value)
    monkeypatch.setattr(hub, "hub_is_reachable", lambda: False)
    with pytest.raises(hub.HubPublishError, match="not reachable"):
        hub.push_files_to_hub("me/model", files, token=token)


@pytest.fixture(scope="module")
def mixed_sizes(syn_dir, tmp_path_factory):
    """A flat image/mask folder with frames of two sizes, so eval batches need padding."""
    root = tmp_path_factory.mktemp("mixed")
    small = root / "small_syn"
    generate_synthetic_idd(small, 2, 1, (72, 100), seed=3, workers=1)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    sources = [(syn_dir, p) for p in sorted((syn_dir / "leftImg8bit").rglob("*.png"))[:3]]
    sources += [(small, p) for p in sorted((small / "leftImg8bit").rglob("*.png"))]
    for index, (base, image) in enumerate(sources):
        frame = image.name.replace("_leftImg8bit.png", "")
        mask = base / "gtFine" / image.parent.parent.name / image.parent.name / f"{frame}_gtFine_labellevel3Ids.png"
        shutil.copy(image, root / "images" / f"f{index}.png")
        shutil.copy(mask, root / "masks" / f"f{index}.png")
    return root


def test_flip_tta_working_size_and_level2_export_on_mixed_sizes(mixed_sizes, model_dir, tmp_path):
    arguments = {
        "model_name_or_path": str(model_dir), "image_dir": str(mixed_sizes / "images"),
        "mask_dir": str(mixed_sizes / "masks"), "train_fraction": 0.0, "val_fraction": 0.0, "test_fraction": 1.0,
        "output_dir": str(tmp_path / "ev"), "export_predictions": str(tmp_path / "preds"), "export_level": 2,
        "tta": "flip", "eval_shortest_edge": 64, "working_size": 48, "batch_size": 5, "num_overlays": 0,
        "dataloader_num_workers": 0,
    }
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    results = run_eval.main([str(tmp_path / "args.json")])
    assert results["tta"] == "flip" and results["num_images"] == 5 and results["export_level"] == 2
    assert not (tmp_path / "ev" / "overlays").exists()
    coarse = level2_of_level3()
    pairs = []
    for index in range(5):
        truth = np.array(Image.open(mixed_sizes / "masks" / f"f{index}.png"))
        with Image.open(tmp_path / "preds" / "images" / f"f{index}_gtFine_labellevel2Ids.png") as picture:
            prediction = np.array(picture)
        assert prediction.shape == truth.shape and prediction.max() < 16
        pairs.append((coarse[truth], prediction))
    assert {p.shape for _, p in pairs} == {(HEIGHT, WIDTH), (72, 100)}
    _, mean_iou_level2 = independent_iou(independent_confusion(pairs, 16))
    assert mean_iou_level2 == results["mean_iou_level2"]


def test_flip_tta_is_mirror_symmetric(model_dir):
    from accelerate import Accelerator

    model = load_model(str(model_dir), None).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, 64, 96, generator=generator)
    label = np.zeros((90, 135), dtype=np.uint8)

    def predict(values, tta):
        batch = {"pixel_values": values, "pixel_mask": torch.ones(1, 64, 96, dtype=torch.long),
                 "original_segmentation_maps": [label]}
        with torch.inference_mode():
            return inference.predict_batch(model, batch, Accelerator(), tta)[0]

    averaged = predict(pixel_values, "flip")
    assert averaged.shape == label.shape and averaged.dtype == torch.uint8
    assert torch.equal(predict(pixel_values.flip(-1), "flip").flip(-1), averaged)


def test_shards_cover_every_image_once_with_equal_batch_counts():
    for num_items, num_processes in ((7, 2), (2, 3), (9, 3)):
        shards = [eval_loop.shard_positions(num_items, num_processes, rank) for rank in range(num_processes)]
        real = sorted(i for positions, count in shards for i in positions[:count])
        assert real == list(range(num_items))
        assert len({len(positions) for positions, _ in shards}) == 1


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        run_eval.main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("run_eval.py: error: ")
    return err[-1]


def test_folder_without_config_is_a_clear_error(capsys, syn_dir, tmp_path):
    line = _error_line(capsys, ["--model_name_or_path", str(tmp_path), "--data_dir", str(syn_dir),
                                "--output_dir", str(tmp_path / "ev")])
    assert str(tmp_path) in line and "no config.json" in line


def test_label_set_disagreeing_with_the_model_names_both(capsys, syn_dir, model_dir, tmp_path):
    line = _error_line(capsys, ["--model_name_or_path", str(model_dir), "--data_dir", str(syn_dir),
                                "--label_set", "idd-level1", "--output_dir", str(tmp_path / "ev")])
    assert str(model_dir) in line and "idd-level1" in line and "26 classes" in line and "7 classes" in line
    # The folder was checked and locked before the model was read; nothing was written into it.
    assert [p.name for p in (tmp_path / "ev").iterdir()] == [LOCK_FILE]


def test_ground_truth_of_another_size_names_the_file(capsys, syn_dir, model_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(syn_dir, data)
    mask = sorted((data / "gtFine").rglob("*_gtFine_labellevel3Ids.png"))[4]
    small = cv2.resize(np.array(Image.open(mask)), (WIDTH // 2, HEIGHT // 2), interpolation=cv2.INTER_NEAREST)
    Image.fromarray(small).save(mask)
    line = _error_line(capsys, ["--model_name_or_path", str(model_dir), "--data_dir", str(data),
                                "--output_dir", str(tmp_path / "ev")])
    assert mask.name.replace("_gtFine_labellevel3Ids.png", "") in line and f"{HEIGHT // 2}x{WIDTH // 2}" in line


