"""Two gloo processes on the CPU under ``accelerate launch``: disjoint shards, equal weights, exact metrics, one writer.

The launch line is the one of the README: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``
(plus a free port and the defaults spelled out, so accelerate prints no warnings). Fine-tuning runs through
tests/ddp_finetune_recorder.py, which is run_finetune.main with a per-rank record of the samples loaded, the final
weights' hash and the files written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import run_eval
import run_finetune
from roadseg_utils.evaluation import json_safe
from roadseg_utils.synthetic import generate_synthetic_idd

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
# 24 frames split 12 / 9 / 3: the odd validation split leaves one rank a padded, duplicated sample.
SPLIT_ARGS = ["--train_fraction", "0.5", "--val_fraction", "0.375", "--test_fraction", "0.125"]
NUM_FRAMES, NUM_TRAIN, NUM_VALIDATION = 24, 12, 9
MAX_STEPS, BATCH = 3, 2
FINETUNE_ARGS = [
    "--model_name_or_path", "tiny", *SPLIT_ARGS, "--crop_size", "64x128", "--max_steps", str(MAX_STEPS),
    "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3",
    "--save_strategy", "steps", "--save_steps", str(MAX_STEPS), "--eval_strategy", "no", "--do_predict", "False",
    "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--report_to", "none", "--seed", "11",
]
EVAL_ARGS = [*SPLIT_ARGS, "--split", "validation", "--seed", "11", "--batch_size", "2", "--num_overlays", "2",
             "--protocol", "idd", "--protocol_resolution", "240",
             "--dataloader_num_workers", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(script: Path, args: list[str], record_dir: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``script`` on two CPU processes (gloo)."""
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "ROADSEG_RECORD_DIR": str(record_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    if completed.returncode != 0 and "(SIGABRT)" in completed.stderr:
        # Once in several full-suite runs on the 2-core CI machine a gloo rank has aborted in C++ ("terminate called
        # without an active exception") as the final evaluation starts; 14 repeats under load did not reproduce it.
        # One rerun keeps that rare abort visible (a warning with its log) without turning CI red; any other
        # failure, or a second abort, fails the test.
        warnings.warn(f"a two-process run aborted; rerunning it once:\n{completed.stderr[-3000:]}", stacklevel=2)
        shutil.rmtree(args[args.index("--output_dir") + 1], ignore_errors=True)
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two-process fine-tuning, then run_eval.py of the saved model on two processes and in this one."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "scenes"
    generate_synthetic_idd(data, num_images=NUM_FRAMES, num_sequences=3, image_size=(64, 128), seed=5, workers=1)
    launch_two_processes(REPO / "tests" / "ddp_finetune_recorder.py",
                         ["--data_dir", str(data), "--output_dir", str(root / "ft"), *FINETUNE_ARGS], root)
    model_args = ["--model_name_or_path", str(root / "ft"), "--data_dir", str(data), *EVAL_ARGS]
    launch_two_processes(REPO / "run_eval.py", [*model_args, "--output_dir", str(root / "ev2")], root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_eval.main([*model_args, "--output_dir", str(root / "ev1")])
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "data": data, "ft": root / "ft"}


def rank_records(root: Path) -> list[dict]:
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_each_rank_trains_on_its_own_disjoint_shard(runs):
    first, second = rank_records(runs["root"])
    assert (first["world_size"], second["world_size"]) == (2, 2)
    assert first["num_samples_loaded"] == second["num_samples_loaded"] == MAX_STEPS * BATCH
    assert not set(first["train_paths_seen"]) & set(second["train_paths_seen"])
    # Three steps of 2 x 2 samples cover the 12 training frames exactly once.
    train_split = json.loads((runs["ft"] / "data_splits.json").read_text())["paths"]["train"]
    assert len(train_split) == NUM_TRAIN
    assert sorted(first["train_paths_seen"] + second["train_paths_seen"]) == sorted(train_split)


def test_the_main_process_validates_and_the_other_reads_its_label_cache(runs):
    first, second = rank_records(runs["root"])
    assert (first["label_maps_decoded"], second["label_maps_decoded"]) == (NUM_FRAMES, 0)


def test_final_weights_are_identical_on_both_ranks(runs):
    first, second = rank_records(runs["root"])
    assert first["weights_sha256"] == second["weights_sha256"]


def test_only_the_main_process_writes_files(runs):
    first, second = rank_records(runs["root"])
    assert {"model.safetensors", "config.json", "README.md", "all_results.json", "training_args.bin"} <= set(
        first["written"])
    # The one exception is Trainer's design: each rank keeps its own RNG state in the checkpoint, for resuming.
    assert set(second["written"]) <= {f"checkpoint-{MAX_STEPS}", f"checkpoint-{MAX_STEPS}/rng_state_1.pth"}
    leftovers = [p.name for p in runs["root"].rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture(scope="module")
def single_process_metrics(runs, tmp_path_factory):
    """Validation metrics of the saved two-process model, scored by run_finetune.py in this one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single")
        argv = ["--data_dir", str(runs["data"]), "--output_dir", str(out), *FINETUNE_ARGS,
                "--model_name_or_path", str(runs["ft"]), "--do_train", "False"]
        return run_finetune.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_validation_metrics_equal_a_single_process_evaluation(runs, single_process_metrics):
    distributed = json.loads((runs["ft"] / "all_results.json").read_text())
    assert distributed["eval_num_images"] == single_process_metrics["eval_num_images"] == NUM_VALIDATION
    scores = [key for key in single_process_metrics
              if key.startswith(("eval_iou_", "eval_mean_", "eval_overall_", "eval_frequency"))]
    assert "eval_mean_iou" in scores and len(scores) > 20
    for key in scores:
        # all_results.json holds NaN (a class in neither references nor predictions) as null.
        assert distributed[key] == json_safe(single_process_metrics[key]), key


def test_run_eval_under_two_processes_equals_one_process(runs):
    two = json.loads((runs["root"] / "ev2" / "eval_results.json").read_text())
    one = json.loads((runs["root"] / "ev1" / "eval_results.json").read_text())
    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    assert two["num_images"] == one["num_images"] == NUM_VALIDATION
    assert two["labelled_pixels"] == one["labelled_pixels"] > 0
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["mean_iou"] == one["mean_iou"]
    assert two["idd_protocol"] == one["idd_protocol"] and one["idd_protocol"]["resolution"] == 240
    written = sorted(p.relative_to(runs["root"] / "ev2").as_posix() for p in (runs["root"] / "ev2").rglob("*"))
    assert "eval_results.json" in written and not [name for name in written if name.endswith(".tmp")]

