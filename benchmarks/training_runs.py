"""What the training benchmarks (transfer, recipe) share: the demo data, a validation-curve callback, mean +- std."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from roadseg_utils.synthetic import generate_synthetic_idd


def ensure_demo_data(data_dir: str | Path) -> None:
    """Write the demo's 300 synthetic 360x640 scenes (12 sequences, seed 0) to ``data_dir`` unless they are there."""
    if not (Path(data_dir) / "leftImg8bit").is_dir():
        generate_synthetic_idd(data_dir, num_images=300, num_sequences=12, seed=0)


class ValidationCurve(TrainerCallback):
    """Records (step, validation mIoU) at every evaluation."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        """Keep the step and the validation mIoU."""
        if metrics and "eval_mean_iou" in metrics:
            self.points.append((state.global_step, float(metrics["eval_mean_iou"])))


def mean_std(values: list[float]) -> str:
    """``mean +- std`` over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def training_parser(description: str, choice: str, choices: list[str], steps: int, eval_steps: int, seeds: str,
                    work_dir: str) -> argparse.ArgumentParser:
    """The options both studies take: which runs (``--<choice>``), steps, seeds, recipe, data and work folders."""
    parser = argparse.ArgumentParser(description=description)
    # argparse %-formats help strings.
    listed = ", ".join(choices).replace("%", "%%")
    parser.add_argument(f"--{choice}", default="all", help=f"comma-separated subset of {listed}, or all")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--eval_steps", type=int, default=eval_steps)
    parser.add_argument("--seeds", default=seeds, help="comma-separated training seeds")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", default="192x320")
    parser.add_argument("--data_dir", default="data/transfer", help="demo data (written once if missing)")
    parser.add_argument("--work_dir", default=work_dir)
    return parser


def chosen(parser: argparse.ArgumentParser, option: str, value: str, choices: list[str]) -> list[str]:
    """The runs an ``all``-or-comma-list option names; an unknown one is a parser error."""
    picked = list(choices) if value == "all" else value.split(",")
    unknown = [name for name in picked if name not in choices]
    if unknown:
        parser.error(f"--{option}: unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
    return picked


def demo_recipe(args: argparse.Namespace, seed: int, output_dir: Path, learning_rate: float) -> list[str]:
    """``run_finetune.py`` arguments of the demo recipe: data, crops, scale jitter 0.75-1.25, lr, seed, output."""
    return [
        "--data_dir", args.data_dir, "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--per_device_train_batch_size", str(args.batch_size), "--crop_size", args.crop_size,
        "--min_scale", "0.75", "--max_scale", "1.25", "--eval_shortest_edge", args.crop_size.split("x")[0],
        "--learning_rate", str(learning_rate), "--save_strategy", "no", "--seed", str(seed),
        "--disable_tqdm", "True", "--dataloader_num_workers", "0", "--log_level", "warning",
    ]
