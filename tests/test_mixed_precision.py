"""--bf16 on the CPU: run_finetune.py trains under bfloat16 autocast with a finite loss, and run_eval.py scores it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import run_eval
import run_finetune
from roadseg_utils.synthetic import generate_synthetic_idd

SPLIT_ARGS = ["--train_fraction", "0.5", "--val_fraction", "0.25", "--test_fraction", "0.25"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HeadOutputDtypes(TrainerCallback):
    """Records the dtype of the class head's output on every training forward pass."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []
        self.training = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.training = True
        model.class_predictor.register_forward_hook(
            lambda module, inputs, output: self.dtypes.append(output.dtype) if self.training else None
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False


def test_bf16_fine_tuning_and_evaluation_on_the_cpu(tmp_path: Path):
    scenes = tmp_path / "scenes"
    generate_synthetic_idd(scenes, num_images=12, num_sequences=2, image_size=(64, 128), seed=4, workers=1)
    output_dir = tmp_path / "bf16"
    dtypes = HeadOutputDtypes()
    results = run_finetune.main([
        "--model_name_or_path", "tiny", "--data_dir", str(scenes), "--output_dir", str(output_dir), *SPLIT_ARGS,
        "--crop_size", "64x128", "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--eval_strategy", "no", "--save_strategy", "no", "--do_predict", "False",
        "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "True", "--bf16", "--use_cpu",
    ], callbacks=[dtypes])

    # Autocast ran the heads in bfloat16; the master weights stay float32.
    assert dtypes.dtypes and set(dtypes.dtypes) == {torch.bfloat16}
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    weights = load_file(output_dir / "model.safetensors")
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert 0 <= results["eval_mean_iou"] <= 1 and results["eval_num_images"] == 3

    evaluated = run_eval.main(["--model_name_or_path", str(output_dir), "--data_dir", str(scenes), *SPLIT_ARGS,
                               "--split", "validation", "--output_dir", str(tmp_path / "ev"), "--num_overlays", "1",
                               "--dataloader_num_workers", "0"])
    written = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert written["num_images"] == 3 and written["labelled_pixels"] > 0
    assert written["mean_iou"] == evaluated["mean_iou"] and 0 <= written["mean_iou"] <= 1
