"""The whole pipeline, run as a user runs it, on whatever package versions the running venv holds.

`make test-compat` runs this module in a second venv holding the lowest versions requirements.txt admits, so the
lower bounds there are measured, not guessed. `make test` skips it (tests/conftest.py): the rest of the suite
covers the same paths in depth on the newest versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FINETUNE = [
    "--model_name_or_path", "tiny", "--per_device_train_batch_size", "2", "--crop_size", "64x96",
    "--eval_shortest_edge", "64", "--save_strategy", "steps", "--save_steps", "5", "--eval_strategy", "no",
    "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--seed", "3",
]


def run(*args: str) -> subprocess.CompletedProcess:
    """A script of the repository run to completion offline; fails the test with its output when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """40 synthetic frames in 4 sequences, and the 20-image selection made from them."""
    root = tmp_path_factory.mktemp("compat")
    run("-m", "roadseg_utils.synthetic", "--output_dir", str(root / "data"), "--num_images", "40",
        "--num_sequences", "4", "--image_size", "90x160", "--seed", "0")
    run("run_selection.py", "--data_dir", str(root / "data"), "--num_images", "20", "--output_dir",
        str(root / "selection"), "--materialize", "hf_dataset", "--materialize_dir", str(root / "subset"))
    return root


def test_selection_finetune_with_resume_eval_and_pipeline(tree):
    manifest = json.loads((tree / "selection" / "manifest.json").read_text())
    assert sum(row["selected"] for row in manifest["rows"]) == 20

    common = ["--data_dir", str(tree / "data"), "--selection_manifest", str(tree / "selection" / "manifest.json")]
    interrupted, straight = tree / "ft-resumed", tree / "ft-straight"
    run("run_finetune.py", *FINETUNE, *common, "--output_dir", str(interrupted), "--max_steps", "5")
    resumed = run("run_finetune.py", *FINETUNE, *common, "--output_dir", str(interrupted), "--max_steps", "10")
    assert "resuming from" in resumed.stdout + resumed.stderr
    run("run_finetune.py", *FINETUNE, *common, "--output_dir", str(straight), "--max_steps", "10")

    from safetensors.torch import load_file

    first, second = load_file(interrupted / "model.safetensors"), load_file(straight / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[key] == second[key]).all() for key in first), "a resumed run ended with other weights"

    run("run_eval.py", "--model_name_or_path", str(straight), "--data_dir", str(tree / "data"), "--output_dir",
        str(tree / "eval"), "--dataloader_num_workers", "0")
    results = json.loads((tree / "eval" / "eval_results.json").read_text())
    assert results["num_images"] > 0 and 0 <= results["mean_iou"] <= 1

    from PIL import Image
    from transformers import pipeline

    segments = pipeline("image-segmentation", model=str(straight), subtask="semantic")(Image.new("RGB", (96, 64)))
    assert segments and all(segment["mask"].size == (96, 64) for segment in segments)


def test_finetune_from_the_materialized_hf_dataset(tree):
    run("run_finetune.py", *FINETUNE, "--dataset_name", str(tree / "subset"), "--output_dir", str(tree / "ft-hf"),
        "--max_steps", "2", "--save_strategy", "no", "--do_predict", "False")
    assert (tree / "ft-hf" / "model.safetensors").is_file()
