"""Fault cases of run_finetune.py: bad arguments, unusable or shared output folders, kills and partial checkpoints,
bad samples met inside DataLoader workers, full disks.

Each case builds the fault for real and asserts the promise: one error line naming the option, file or folder with
exit status 1 and no traceback, before any expensive work; nothing half-written that looks complete; or a correct
result (a resumed run ends with the bitwise weights of an uninterrupted one).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

import run_finetune
from roadseg_utils import hub
from roadseg_utils.output_dir import INCOMPLETE_FILE, LOCK_FILE, RUN_FILE
from tests.faults.conftest import REPO, make_tree, mounted_tmpfs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--model_name_or_path", "tiny", "--crop_size", "32x48", "--eval_strategy", "no",
        "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--disable_tqdm", "True",
        "--report_to", "none", "--train_fraction", "0.5", "--val_fraction", "0.25", "--test_fraction", "0.25",
        "--learning_rate", "1e-3", "--seed", "7"]
# Four steps with a checkpoint after each: the run that kills and resumes are compared with.
RESUMABLE = [*FAST, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1", "--do_eval", "False",
             "--do_predict", "False"]
FINAL_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "training_args.bin", "all_results.json",
               "README.md", "data_splits.json", "trainer_state.json")


def finetune(data: Path, output_dir: Path, *extra: str) -> dict:
    """run_finetune.main in this process on ``data`` with the tiny model."""
    return run_finetune.main(["--data_dir", str(data), "--output_dir", str(output_dir), *FAST, *extra])


def error_line(capsys, exit_info) -> str:
    """The one error line of a refused run: exit status 1, no traceback, one ``error:`` line, last on stderr."""
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("run_finetune.py: error: "), captured.err[-2000:]
    assert captured.err.rstrip().endswith(lines[0])
    return lines[0]


def refused(capsys, argv: list[str]) -> str:
    """Run main(argv), expect a refusal, and return its error line."""
    with pytest.raises(SystemExit) as exit_info:
        run_finetune.main(argv)
    return error_line(capsys, exit_info)


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_weights(actual: Path, expected: Path) -> None:
    """Bitwise equal model.safetensors tensors."""
    got, want = weights(actual), weights(expected)
    assert got.keys() == want.keys()
    different = [name for name in want if not (got[name] == want[name]).all()]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A 12-image 48x80 tree shared by the cases that do not damage it."""
    return make_tree(tmp_path_factory.mktemp("ft_data") / "data")


@pytest.fixture
def own_data(data, tmp_path) -> Path:
    """A copy of the shared tree that a case may damage."""
    return Path(shutil.copytree(data, tmp_path / "data"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory, one_torch_thread) -> Path:
    """The output folder of an uninterrupted RESUMABLE run."""
    output_dir = tmp_path_factory.mktemp("straight") / "run"
    run_finetune.main(["--data_dir", str(data), "--output_dir", str(output_dir), *RESUMABLE])
    return output_dir


@pytest.fixture
def no_work(monkeypatch):
    """Make loading data fail the test: a refusal must come before it."""
    def loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the refusal")
    monkeypatch.setattr(run_finetune, "load_segmentation_dataset", loading)


# --- arguments: one line at parse time, before the output folder is even created --------------------------------

BAD_ARGUMENTS = {
    "batch-size-zero": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    "batch-size-negative": (["--per_device_train_batch_size", "-4"], "--per_device_train_batch_size"),
    "eval-batch-size-zero": (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    "learning-rate-nan": (["--learning_rate", "nan"], "--learning_rate"),
    "learning-rate-negative": (["--learning_rate", "-1e-4"], "--learning_rate"),
    "learning-rate-inf": (["--learning_rate", "inf"], "--learning_rate"),
    "epochs-zero-nothing-to-do": (["--num_train_epochs", "0"], "--num_train_epochs 0"),
    "max-steps-zero": (["--max_steps", "0"], "--max_steps must be positive"),
    "save-steps-zero": (["--save_strategy", "steps", "--save_steps", "0"], "--save_steps"),
    "gradient-accumulation-zero": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    "crop-size-zero": (["--crop_size", "0x48"], "--crop_size"),
    "crop-size-malformed": (["--crop_size", "32by48"], "--crop_size"),
    "min-scale-above-max": (["--min_scale", "3", "--max_scale", "2"], "min_scale"),
    "min-scale-zero": (["--min_scale", "0"], "min_scale"),
    "max-scale-inf": (["--max_scale", "inf"], "max_scale"),
    "fractions-not-summing": (["--train_fraction", "0.9", "--val_fraction", "0.3"], "sum to 1"),
    "not-a-number": (["--max_steps", "four"], "--max_steps"),
    "unknown-option": (["--no_such_option", "1"], "--no_such_option"),
}


@pytest.mark.parametrize("extra, needle", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_is_one_line_before_any_work(extra, needle, tmp_path, capsys):
    output_dir = tmp_path / "out"
    line = refused(capsys, ["--data_dir", str(tmp_path), "--output_dir", str(output_dir), *FAST, *extra])
    assert needle in line
    assert not output_dir.exists()


def test_missing_selection_manifest_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "manifest.json"
    line = refused(capsys, ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *FAST,
                            "--selection_manifest", str(missing)])
    assert f"--selection_manifest {missing}: no such file" in line


BAD_CONFIGS = {
    "json-malformed": ('{"model_name_or_path": "tiny", "output_dir": ', "not a readable JSON argument file"),
    "json-not-an-object": ('["--model_name_or_path", "tiny"]', "expected a JSON object"),
    "json-unknown-key": ('{"output_dir": "out", "learning_rat": 0.001}', "learning_rat"),
    "json-nan-learning-rate": ('{"output_dir": "out", "learning_rate": NaN}', "--learning_rate"),
}


@pytest.mark.parametrize("text, needle", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_json_argument_file_is_one_line_naming_it(text, needle, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(text)
    line = refused(capsys, [str(config)])
    assert str(config) in line and needle in line


# --- the output folder: checked, locked and owned before any work --------------------------------------------------

def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys, no_work):
    output_dir = tmp_path / "out"
    output_dir.write_text("not a folder")
    line = refused(capsys, ["--data_dir", str(tmp_path), "--output_dir", str(output_dir), *FAST])
    assert f"{output_dir}: is a file" in line


def test_output_dir_that_cannot_be_created_is_refused_before_loading(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    output_dir = tmp_path / "file" / "out"
    line = refused(capsys, ["--data_dir", str(tmp_path), "--output_dir", str(output_dir), *FAST])
    assert f"{output_dir}: cannot create it" in line


def test_read_only_output_dir_is_refused_before_loading(tmp_path, capsys, no_work):
    with mounted_tmpfs("1m", read_only=True) as disk:
        line = refused(capsys, ["--data_dir", str(tmp_path), "--output_dir", str(disk), *FAST])
    assert f"{disk}: cannot write into it" in line


def test_explicit_incomplete_checkpoint_is_refused_before_loading(straight, tmp_path, capsys, no_work):
    checkpoint = Path(shutil.copytree(straight / "checkpoint-4", tmp_path / "checkpoint-4"))
    (checkpoint / "optimizer.pt").write_bytes((checkpoint / "optimizer.pt").read_bytes()[:5000])
    line = refused(capsys, ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *FAST,
                            "--max_steps", "5", "--resume_from_checkpoint", str(checkpoint)])
    assert f"--resume_from_checkpoint {checkpoint}: optimizer.pt is truncated" in line


def test_second_concurrent_run_is_refused_and_the_first_finishes_untouched(data, tmp_path, capsys):
    output_dir = tmp_path / "shared"
    first = subprocess.Popen(
        [sys.executable, "run_finetune.py", "--data_dir", str(data), "--output_dir", str(output_dir), *FAST,
         "--max_steps", "12", "--save_strategy", "no", "--do_predict", "False"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:
        lock = output_dir / LOCK_FILE
        deadline = time.monotonic() + 120
        while f"pid {first.pid}" not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        line = refused(capsys, ["--data_dir", str(data), "--output_dir", str(output_dir), *FAST, "--max_steps", "2"])
        assert f"run_finetune.py (pid {first.pid}) is writing into this folder" in line
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 12
    assert not (output_dir / INCOMPLETE_FILE).exists()


def test_rerun_with_other_data_is_refused_not_resumed_and_overwrite_starts_over(data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    finetune(data, output_dir, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--do_eval",
             "False", "--do_predict", "False")
    before = (output_dir / "checkpoint-2" / "model.safetensors").read_bytes()
    capsys.readouterr()
    # Same file names, other pixels: only the data folder tells the runs apart.
    other = make_tree(tmp_path / "other", seed=1)
    line = refused(capsys, ["--data_dir", str(other), "--output_dir", str(output_dir), *FAST, "--max_steps", "4"])
    assert f"{output_dir} holds the outputs of a run with data" in line and "--overwrite_output_dir" in line
    assert (output_dir / "checkpoint-2" / "model.safetensors").read_bytes() == before

    results = finetune(other, output_dir, "--max_steps", "1", "--overwrite_output_dir", "True", "--do_eval", "False",
                       "--do_predict", "False", "--save_strategy", "no")
    assert results["train_samples"] == 6
    assert not (output_dir / "checkpoint-2").exists()
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1
    assert json.loads((output_dir / RUN_FILE).read_text())["data"] == str(other)


# --- kills and partial checkpoints: resume from the newest complete one, same final weights ------------------------

def killed_run_folder(straight: Path, tmp_path: Path) -> Path:
    """What a run killed while writing checkpoint-4 leaves: checkpoints 3 and 4, no final files, the marker."""
    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    for name in FINAL_FILES:
        (output_dir / name).unlink()
    (output_dir / INCOMPLETE_FILE).write_text("killed\n")
    return output_dir


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


PARTIAL_CHECKPOINTS = {
    "model-safetensors-missing": lambda c: (c / "model.safetensors").unlink(),
    "model-safetensors-truncated": lambda c: truncate(c / "model.safetensors", 0.7),
    "model-safetensors-header-only": lambda c: truncate(c / "model.safetensors", 0.001),
    "optimizer-truncated": lambda c: truncate(c / "optimizer.pt"),
    "scheduler-missing": lambda c: (c / "scheduler.pt").unlink(),
    "rng-state-truncated": lambda c: truncate(c / "rng_state.pth", 0.9),
    "trainer-state-missing": lambda c: (c / "trainer_state.json").unlink(),
    "trainer-state-truncated": lambda c: truncate(c / "trainer_state.json"),
}


@pytest.mark.parametrize("damage", PARTIAL_CHECKPOINTS.values(), ids=PARTIAL_CHECKPOINTS.keys())
def test_partial_newest_checkpoint_is_skipped_and_resume_ends_with_the_same_weights(damage, data, straight,
                                                                                    tmp_path, caplog):
    output_dir = killed_run_folder(straight, tmp_path)
    damage(output_dir / "checkpoint-4")
    run_finetune.main(["--data_dir", str(data), "--output_dir", str(output_dir), *RESUMABLE])
    log = caplog.text
    assert f"not resuming from {output_dir / 'checkpoint-4'}" in log
    assert f"resuming from {output_dir / 'checkpoint-3'}" in log
    assert_same_weights(output_dir, straight)
    assert not (output_dir / INCOMPLETE_FILE).exists()


class CtrlCAtStep2(TrainerCallback):
    """Send this process a real SIGINT after the second step, before its checkpoint, as Ctrl-C would."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_training_is_one_line_and_resumable(data, straight, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = ["--data_dir", str(data), "--output_dir", str(output_dir), *RESUMABLE]
    with pytest.raises(SystemExit) as exit_info:
        run_finetune.main(argv, callbacks=[CtrlCAtStep2()])
    assert "interrupted; rerun the same command to resume" in error_line(capsys, exit_info)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (output_dir / INCOMPLETE_FILE).exists() and not (output_dir / "model.safetensors").exists()
    run_finetune.main(argv)
    assert_same_weights(output_dir, straight)


FREEZING_MODES = {
    "frozen-backbone-and-pixel-decoder": [],
    "unfreeze-pixel-decoder": ["--unfreeze_pixel_decoder", "True"],
    "unfreeze-backbone": ["--unfreeze_backbone", "True"],
    "unfreeze-both": ["--unfreeze_backbone", "True", "--unfreeze_pixel_decoder", "True"],
}


@pytest.mark.parametrize("mode", FREEZING_MODES.values(), ids=FREEZING_MODES.keys())
def test_resume_restores_every_weight_in_every_freezing_mode(mode, data, tmp_path, caplog):
    argv = ["--data_dir", str(data), *RESUMABLE, *mode]
    run_finetune.main([*argv, "--output_dir", str(tmp_path / "straight")])
    output_dir = killed_run_folder(tmp_path / "straight", tmp_path)
    shutil.rmtree(output_dir / "checkpoint-4")
    caplog.clear()
    run_finetune.main([*argv, "--output_dir", str(output_dir)])
    assert f"resuming from {output_dir / 'checkpoint-3'}" in caplog.text
    # Upstream resumed with "missing keys" for every Swin tensor (saved under other names) and kept stale weights.
    assert "missing keys" not in caplog.text.lower() and "were not initialized" not in caplog.text
    assert_same_weights(output_dir, tmp_path / "straight")


KILL_DRIVER = r'''
import json, os, random, signal, sys
from pathlib import Path
import torch, transformers.modeling_utils as modeling_utils
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerState
import run_finetune

seed, argv = int(sys.argv[1]), sys.argv[2:]
rng = random.Random(seed)
# 31 points: 4 x (a step's end and the 6 files of its checkpoint), then the final model.safetensors,
# training_args.bin and trainer_state.json.
target, how, keep = rng.randrange(1, 32), rng.choice(["before", "during"]), rng.uniform(0.0, 0.95)
count = 0

def point(path=None):
    """Count one kill point; at the chosen one, die (leaving a prefix of ``path`` when killed during its write)."""
    global count
    count += 1
    if count != target:
        return
    if path is not None and how == "during" and os.path.exists(path):
        os.truncate(path, int(os.path.getsize(path) * keep))
    tasks = Path("/proc/self/task").iterdir()
    children = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    print(f"killed at point {count}: {how} {path}", flush=True)
    print("CHILDREN", json.dumps(children), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

def writer(write, path_of):
    def wrapped(*args, **kwargs):
        if how == "before":
            point(path_of(*args))
        result = write(*args, **kwargs)
        if how == "during":
            point(path_of(*args))
        return result
    return wrapped

modeling_utils.safe_save_file = writer(modeling_utils.safe_save_file, lambda tensors, path, *a: str(path))
torch.save = writer(torch.save, lambda obj, path, *a: str(path))
TrainerState.save_to_json = writer(TrainerState.save_to_json, lambda state, path: str(path))

class KillBetweenSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        point()

run_finetune.main(argv, callbacks=[KillBetweenSteps()])
sys.exit(3)  # the chosen point was never reached
'''


def running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


KILLS = {
    # seed, data-loader workers, workers alive at the kill; the point the seed picks is in the comment.
    "kill-writing-checkpoint-3-weights": (12, "0", 0),  # checkpoint-3/model.safetensors cut at 62 %
    "kill-before-any-checkpoint-is-complete-with-a-worker": (18, "1", 1),  # before checkpoint-1/rng_state.pth
    "kill-writing-the-final-model-after-the-last-checkpoint": (23, "0", 0),  # the final training_args.bin at 85 %
}


@pytest.mark.parametrize("seed, workers, alive", KILLS.values(), ids=KILLS.keys())
def test_sigkill_at_a_seeded_random_point_then_rerun_gives_the_same_weights(seed, workers, alive, data, straight,
                                                                            tmp_path):
    output_dir = tmp_path / "run"
    argv = ["--data_dir", str(data), "--output_dir", str(output_dir), *RESUMABLE]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, str(seed), *argv, "--dataloader_num_workers", workers], cwd=REPO,
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    children = json.loads(killed.stdout.split("CHILDREN", 1)[1].splitlines()[0])
    assert len(children) == alive, killed.stdout[-2000:]
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(running(pid) for pid in children), "a data-loader worker outlived its killed run"
    assert (output_dir / INCOMPLETE_FILE).exists(), "a killed run left no RUN_INCOMPLETE marker"
    run_finetune.main(argv)  # with no worker: the weights do not depend on the number of workers
    assert_same_weights(output_dir, straight)
    assert not (output_dir / INCOMPLETE_FILE).exists()
    assert not list(output_dir.rglob(".saving-*")), "a killed save's temporary folder was left behind"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 4


# --- bad samples met only inside a DataLoader worker -----------------------------------------------------------------

def truncated_jpeg() -> bytes:
    """A JPEG cut off right after its header: its size reads, its pixels do not."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: data.index(b"\xff\xda") + 20]  # up to a few bytes into the scan


def break_after_validation(monkeypatch, split: str) -> list[Path]:
    """Replace the first image of ``split`` by a truncated JPEG once start-up validation has passed it."""
    load = run_finetune.load_segmentation_dataset
    broken: list[Path] = []

    def load_then_break(args, *rest, **kwargs):
        splits = load(args, *rest, **kwargs)
        image = Path(args.data_dir) / splits[split].with_format("arrow")["path"][0].as_py()
        image.write_bytes(truncated_jpeg())
        broken.append(image)
        return splits

    monkeypatch.setattr(run_finetune, "load_segmentation_dataset", load_then_break)
    return broken


@pytest.mark.parametrize("workers", ["0", "1"], ids=["error-in-main-process", "error-in-worker"])
def test_bad_sample_met_in_training_stops_with_one_line_naming_it(workers, own_data, tmp_path, capsys,
                                                                  monkeypatch):
    broken = break_after_validation(monkeypatch, "train")
    line = refused(capsys, ["--data_dir", str(own_data), "--output_dir", str(tmp_path / "out"), *FAST,
                            "--max_steps", "3", "--dataloader_num_workers", workers])
    assert str(broken[0]) in line and "cannot read image" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / INCOMPLETE_FILE).exists()


@pytest.mark.parametrize("workers", ["0", "1"], ids=["skip-in-main-process", "skip-in-worker"])
def test_bad_sample_met_in_training_is_skipped_with_skip(workers, own_data, tmp_path, monkeypatch):
    broken = break_after_validation(monkeypatch, "train")
    # Batches of 6 go through the whole train split every step, so the broken image is met at once.
    results = finetune(own_data, tmp_path / "out", "--max_steps", "2", "--per_device_train_batch_size", "6",
                       "--on_bad_sample", "skip", "--dataloader_num_workers", workers, "--do_eval", "False",
                       "--do_predict", "False")
    assert broken and results["train_samples"] == 6
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / INCOMPLETE_FILE).exists()


@pytest.mark.parametrize("batch_size", ["1", "3"], ids=["eval-batch-of-only-the-bad-sample", "eval-batch-mixed"])
def test_bad_sample_met_in_evaluation_is_left_out_of_the_scores_with_skip(batch_size, own_data, tmp_path,
                                                                          monkeypatch):
    break_after_validation(monkeypatch, "validation")
    # Batches of one: the broken image's batch holds nothing else; of three: it holds the two good ones too.
    results = finetune(own_data, tmp_path / "out", "--max_steps", "1", "--on_bad_sample", "skip",
                       "--per_device_eval_batch_size", batch_size, "--dataloader_num_workers", "1")
    assert results["eval_num_images"] == 2 and results["test_num_images"] == 3
    assert np.isfinite(results["eval_mean_iou"]) and np.isfinite(results["eval_loss"])


def test_bad_sample_met_in_evaluation_stops_with_one_line_with_error(own_data, tmp_path, capsys, monkeypatch):
    broken = break_after_validation(monkeypatch, "test")
    line = refused(capsys, ["--data_dir", str(own_data), "--output_dir", str(tmp_path / "out"), *FAST,
                            "--max_steps", "1", "--dataloader_num_workers", "1"])
    assert str(broken[0]) in line
    assert (tmp_path / "out" / INCOMPLETE_FILE).exists()


def test_every_mask_all_ignore_is_one_line_not_a_nan_miou(own_data, tmp_path, capsys):
    for mask in own_data.rglob("*_labellevel3Ids.png"):
        Image.fromarray(np.full((48, 80), 255, dtype=np.uint8)).save(mask)
    for polygons in own_data.rglob("*_polygons.json"):
        polygons.unlink()
    line = refused(capsys, ["--data_dir", str(own_data), "--output_dir", str(tmp_path / "out"), *FAST,
                            "--max_steps", "1"])
    assert "labelled pixel" in line


# --- full disks: one line, a resumable state, nothing that looks complete ------------------------------------------

def test_disk_full_while_checkpointing_is_one_line_and_resumable(data, straight, tmp_path, capsys):
    with mounted_tmpfs("10m") as disk:
        output_dir = disk / "run"
        argv = ["--data_dir", str(data), "--output_dir", str(output_dir), *RESUMABLE]
        line = refused(capsys, argv)
        assert "cannot write" in line and "checkpoint-2: no space left on the device" in line
        assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
        assert (output_dir / INCOMPLETE_FILE).exists() and not (output_dir / "model.safetensors").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_finetune.main(argv)
        assert_same_weights(output_dir, straight)
        assert not (output_dir / INCOMPLETE_FILE).exists()


def test_disk_full_while_saving_the_final_model_leaves_it_marked_incomplete(data, tmp_path, capsys):
    with mounted_tmpfs("3m") as disk:
        line = refused(capsys, ["--data_dir", str(data), "--output_dir", str(disk), *FAST, "--max_steps", "1",
                                "--save_strategy", "no"])
        assert f"cannot write {disk}: no space left on the device" in line
        assert (disk / INCOMPLETE_FILE).exists()
        # The half-written weights never reached their place, and nothing of the attempt is left.
        assert sorted(path.name for path in disk.iterdir()) == sorted([LOCK_FILE, INCOMPLETE_FILE, RUN_FILE])


def test_push_to_hub_offline_is_one_line_before_training(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    hub.hub_is_reachable.cache_clear()
    line = refused(capsys, ["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), *FAST, "--max_steps",
                            "1", "--push_to_hub", "True", "--hub_model_id", "someone/roadseg"])
    assert "--push_to_hub" in line
    assert not list((tmp_path / "out").glob("checkpoint-*"))
