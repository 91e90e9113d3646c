"""Publishing offline: run_finetune.py and run_eval.py with --push_to_hub against a Hub whose network layer is fake.

Replaced are only the HfApi calls that talk to the Hub: ``create_repo``, ``_validate_yaml`` (the Hub's YAML check
that ``upload_folder`` runs on README.md), ``create_commit`` and the xet ``pipelined_upload`` that ``upload_folder``
uses when hf_xet is installed. Everything above them runs for real: Trainer.push_to_hub, HfApi.upload_folder with
its file walk and ignore patterns, roadseg's push_files_to_hub. Any other network access fails the test.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCardData, RepoUrl
from huggingface_hub import _upload_pipeline as upload_pipeline
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from PIL import Image
from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation, pipeline

import run_eval
import run_finetune
from roadseg_utils import hub
from roadseg_utils.labels import idd_label_set
from roadseg_utils.synthetic import generate_synthetic_idd

TOKEN = "hf_FAKE_TOKEN_123456789abcdef"
REPO_ID = "roadseg-tests/tiny-idd"
SPLIT_ARGS = ["--train_fraction", "0.5", "--val_fraction", "0.25", "--test_fraction", "0.25"]
LEVEL3 = idd_label_set(3)


class FakeHub:
    """Records what reaches the network layer and keeps a copy of every uploaded file."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.repos: list[tuple[str, str | None, bool | None]] = []
        self.commits: list[dict] = []
        self.validated_cards: list[str] = []

    def create_repo(self, api: HfApi, repo_id: str, *, token=None, private=None, **kwargs) -> RepoUrl:
        self.repos.append((repo_id, token or api.token, private))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def validate_yaml(self, api: HfApi, content: str, *, repo_type=None, token=None) -> None:
        self.validated_cards.append(content)

    def commit(self, repo_id: str, operations, commit_message: str, token) -> CommitInfo:
        folder = self.store / f"commit{len(self.commits)}"
        for operation in operations:
            target = folder / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        self.commits.append({"repo_id": repo_id, "files": sorted(op.path_in_repo for op in operations),
                             "message": commit_message, "token": token, "folder": folder})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.commits)}",
                          commit_message=commit_message, commit_description="", oid=f"{len(self.commits):040x}")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")

    def refuse_connection(self, address):
        raise AssertionError(f"unexpected network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    monkeypatch.setattr(hub, "hub_is_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(run_eval, "hub_is_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: fake.create_repo(self, repo_id, **kw))
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: fake.validate_yaml(self, content, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, commit_message, token=None, **kw:
                        fake.commit(repo_id, operations, commit_message, token or self.token))
    monkeypatch.setattr(upload_pipeline, "pipelined_upload", lambda api, *, repo_id, add_operations,
                        delete_operations, commit_message, token=None, **kw:
                        fake.commit(repo_id, add_operations, commit_message, token or api.token))
    return fake


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_idd(root, num_images=16, num_sequences=2, image_size=(64, 128), seed=9, workers=1)
    return root


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret`` (plain, or inside pickles and zip archives)."""
    return [str(path) for path in root.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def parsed_card_metadata(card_path: Path) -> dict:
    """The card's YAML parsed the way huggingface_hub reads it; raises on a malformed model-index."""
    metadata = metadata_load(card_path)
    data = ModelCardData(**metadata)
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert eval_results_to_model_index(model_name, results) == metadata["model-index"]
    return {"metadata": metadata, "data": data, "results": results, "model_name": model_name}


def test_finetune_and_eval_push_the_folder_card_and_plots_without_leaking_the_token(
    scenes, tmp_path, fake_hub, capfd, caplog
):
    output_dir = tmp_path / "ft"
    run_finetune.main([
        "--model_name_or_path", "tiny", "--data_dir", str(scenes), "--output_dir", str(output_dir), *SPLIT_ARGS,
        "--crop_size", "64x128", "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
        "--save_steps", "2", "--eval_strategy", "no", "--dataloader_num_workers", "0", "--report_to", "none",
        "--disable_tqdm", "True", "--push_to_hub", "--hub_model_id", REPO_ID, "--hub_private_repo", "True",
        "--hub_token", TOKEN, "--hub_strategy", "end",
    ])

    assert fake_hub.repos == [(REPO_ID, TOKEN, True)]
    [commit] = fake_hub.commits
    assert commit["repo_id"] == REPO_ID and commit["message"] == "roadseg run_finetune.py"
    assert commit["token"] == TOKEN  # the token authenticates the upload ...
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json",
                "data_splits.json", "plots/confusion_matrix_validation.png", "plots/per_class_iou_validation.png",
                "plots/confusion_matrix_test.png", "plots/per_class_iou_test.png"}
    assert expected <= set(commit["files"])
    assert not [name for name in commit["files"] if name.startswith("checkpoint-") or name.endswith(".tmp")]
    assert len(fake_hub.validated_cards) == 1 and fake_hub.validated_cards[0].startswith("---\n")

    # The uploaded folder is a working model: weights, image processor and label maps.
    uploaded = commit["folder"]
    model = Mask2FormerForUniversalSegmentation.from_pretrained(uploaded)
    assert model.config.id2label == LEVEL3.id2label and model.config.label2id == LEVEL3.label2id
    processor = AutoImageProcessor.from_pretrained(uploaded)
    assert processor.size["shortest_edge"] == 64
    image = Image.open(next((scenes / "leftImg8bit").rglob("*.png")))
    segments = pipeline("image-segmentation", model=str(uploaded))(image, subtask="semantic")
    assert segments and all(s["label"] in LEVEL3.label2id and s["mask"].size == image.size for s in segments)
    for plot in (p for p in commit["files"] if p.startswith("plots/")):
        assert np.asarray(Image.open(uploaded / plot)).std() > 0

    card = parsed_card_metadata(uploaded / "README.md")
    metadata = card["metadata"]
    assert {"image-segmentation", "mask2former"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "image-segmentation" and metadata["library_name"] == "transformers"
    assert metadata["license"] == "other" and metadata["datasets"] == ["IDD"]
    assert card["model_name"] == REPO_ID
    written = json.loads((uploaded / "all_results.json").read_text())
    index = {(r.dataset_split, r.metric_type): r.metric_value for r in card["results"]}
    assert index[("validation", "mean_iou")] == pytest.approx(written["eval_mean_iou"], abs=1e-6)
    assert index[("test", "mean_iou")] == pytest.approx(written["test_mean_iou"], abs=1e-6)
    text = (uploaded / "README.md").read_text()
    for heading in ("## Labels", "## Selection", "## Training", "## Results", "## Intended use", "## Limitations",
                    "## License"):
        assert heading in text, heading
    assert all(f"| {class_id} | {name} |" in text for class_id, name in LEVEL3.id2label.items())
    assert "model.pixel_level_module.encoder" in text and "learning_rate" in text
    assert "](plots/per_class_iou_validation.png)" in text

    # run_eval.py pushes its results and the updated card in a second commit.
    run_eval.main(["--model_name_or_path", str(output_dir), "--data_dir", str(scenes), *SPLIT_ARGS, "--split",
                   "validation", "--output_dir", str(tmp_path / "ev"), "--dataloader_num_workers", "0",
                   "--num_overlays", "1", "--push_to_hub", "--hub_model_id", REPO_ID, "--hub_private_repo",
                   "--hub_token", TOKEN])
    assert fake_hub.repos[1:] == [(REPO_ID, TOKEN, True)]
    evaluation = fake_hub.commits[1]
    results = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert evaluation["repo_id"] == REPO_ID and evaluation["token"] == TOKEN
    assert evaluation["message"] == f"Evaluation on validation: mIoU {results['mean_iou']:.4f}"
    assert evaluation["files"] == sorted(["README.md", *(f"eval/validation/{name}" for name in (
        "eval_results.json", "eval_report.md", "confusion_matrix.png", "per_class_iou.png"))])
    card = parsed_card_metadata(evaluation["folder"] / "README.md")
    index = {(r.dataset_split, r.metric_type): r.metric_value for r in card["results"]}
    assert index[("validation", "mean_iou")] == pytest.approx(results["mean_iou"], abs=1e-6)
    assert ("test", "mean_iou") in index

    # ... and appears in no file written and no log line.
    assert files_holding(tmp_path, TOKEN) == []
    assert all((folder / "training_args.bin").is_file() for folder in (output_dir, output_dir / "checkpoint-2"))
    saved_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert saved_args.hub_model_id == REPO_ID and saved_args.hub_token is None
    captured = capfd.readouterr()
    assert "Running training" in captured.out + captured.err + caplog.text  # the logs were captured
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_one_line_gives_the_first_line_or_the_type_and_masks_the_token():
    from roadseg_utils.cli import one_line

    assert one_line(ValueError("\n  first line\nsecond line")) == "first line"
    assert one_line(OSError()) == "OSError"
    assert one_line(RuntimeError("401 for hf_secret123 at /api"), token="hf_secret123") == "401 for <token> at /api"
