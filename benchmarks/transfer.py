"""What a pretrained start buys on the demo data: mIoU after N steps and steps to reach an mIoU, side by side.

Run from the repository root: ``python -m benchmarks.transfer [--steps 200 --seeds 0,1 --starts all
--learning_rates 5e-5,3e-3]``.

Starts (each trained by ``run_finetune.py`` itself, same data, crops, batch and steps):

- ``random-frozen``: the randomly initialised ``tiny`` model, encoder and pixel decoder frozen;
- ``pretrained-random-head``: ``tiny-cityscapes`` frozen, every class-head row (and "no object") random;
- ``pretrained-mapped-head``: ``tiny-cityscapes`` frozen, the head rows mapped from its Cityscapes classes;
- ``pretrained-full``: ``tiny-cityscapes`` with every part trained.

Validation mIoU is taken before the first step (step 0: what the start scores as it is) and every ``--eval_steps``
steps, test mIoU at the end; with several seeds each figure is the
mean +- standard deviation over seeds (the seed moves the data order, the augmentation and the random head rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

import run_finetune
from benchmarks.training_runs import (
    ValidationCurve,
    chosen,
    demo_recipe,
    ensure_demo_data,
    mean_std,
    training_parser,
)
from roadseg_utils.head_init import fresh_head

STARTS: dict[str, tuple[str, list[str]]] = {
    "random-frozen": ("tiny", []),
    "pretrained-random-head": ("tiny-cityscapes", []),
    "pretrained-mapped-head": ("tiny-cityscapes", []),
    "pretrained-full": ("tiny-cityscapes", ["--unfreeze_backbone", "--unfreeze_pixel_decoder"]),
}


class RandomHead(TrainerCallback):
    """Replaces the mapped class head by a fresh one before the first step (the baseline without the mapping)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Re-initialise every row of ``model.class_predictor``."""
        fresh_head(model)


def run_start(start: str, seed: int, learning_rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune one start with one seed and lr; its validation curve, test mIoU and wall time."""
    model, extra = STARTS[start]
    curve = ValidationCurve()
    callbacks = [curve] + ([RandomHead()] if start == "pretrained-random-head" else [])
    output_dir = Path(args.work_dir) / f"{start}-lr{learning_rate:g}-seed{seed}"
    began = time.perf_counter()
    results = run_finetune.main([
        "--model_name_or_path", model, *extra, *demo_recipe(args, seed, output_dir, learning_rate),
        "--max_steps", str(args.steps), "--warmup_steps", str(args.warmup_steps), "--eval_strategy", "steps",
        "--eval_steps", str(args.eval_steps), "--eval_on_start", "True",
    ], callbacks=callbacks)
    return {"curve": curve.points, "test": float(results["test_mean_iou"]), "seconds": time.perf_counter() - began}


def steps_to_reach(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose validation mIoU reaches ``threshold`` (None: never)."""
    return next((step for step, value in curve if value >= threshold), None)


def main(argv: list[str] | None = None) -> dict[float, dict[str, list[dict[str, Any]]]]:
    """Run the chosen starts for every seed and print the table."""
    parser = training_parser(__doc__.split("\n", 1)[0], "starts", list(STARTS), steps=200, eval_steps=25, seeds="0",
                             work_dir="runs/transfer")
    parser.add_argument("--learning_rates", default="3e-3", help="comma-separated: every start runs at each")
    parser.add_argument("--warmup_steps", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.2, help="validation mIoU for 'steps to reach'")
    args = parser.parse_args(argv)
    starts = chosen(parser, "starts", args.starts, list(STARTS))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    learning_rates = [float(value) for value in args.learning_rates.split(",")]
    ensure_demo_data(args.data_dir)
    every = {}
    for learning_rate in learning_rates:
        runs = {start: [run_start(start, seed, learning_rate, args) for seed in seeds] for start in starts}
        print_tables(runs, learning_rate, args)
        every[learning_rate] = runs
    if {"pretrained-random-head", "pretrained-mapped-head"} <= set(starts):
        print(f"\nmapped head - random head, test mIoU @{args.steps} (per seed, then the mean):")
        for learning_rate, runs in every.items():
            gaps = [mapped["test"] - fresh["test"] for mapped, fresh in
                    zip(runs["pretrained-mapped-head"], runs["pretrained-random-head"], strict=True)]
            print(f"lr {learning_rate:<8g}" + "".join(f"{gap:>+9.3f}" for gap in gaps)
                  + f"   mean {statistics.mean(gaps):+.3f}")
    return every


def print_tables(runs: dict[str, list[dict[str, Any]]], learning_rate: float, args: argparse.Namespace) -> None:
    """The validation curve by step and the final figures of every start at one lr."""
    starts = list(runs)
    print(f"\n{args.steps} steps, batch {args.batch_size}, crops {args.crop_size}, lr {learning_rate:g}, "
          f"warm-up {args.warmup_steps}, seeds {args.seeds}, data {args.data_dir}")
    checkpoints = sorted({step for start in starts for step, _ in runs[start][0]["curve"]})
    print("\nvalidation mIoU by step:")
    print(f"{'start':<24}" + "".join(f"{step:>16}" for step in checkpoints))
    for start in starts:
        cells = [mean_std([dict(run["curve"]).get(step, float("nan")) for run in runs[start]]) for step in checkpoints]
        print(f"{start:<24}" + "".join(f"{cell:>16}" for cell in cells))
    print(f"\n{'start':<24}{'val mIoU @' + str(args.steps):>18}{'test mIoU @' + str(args.steps):>18}"
          f"{'steps to val ' + format(args.threshold, 'g'):>20}{'minutes':>10}")
    for start in starts:
        final = [run["curve"][-1][1] for run in runs[start]]
        reached = [steps_to_reach(run["curve"], args.threshold) for run in runs[start]]
        minutes = statistics.mean(run["seconds"] for run in runs[start]) / 60
        print(f"{start:<24}{mean_std(final):>18}{mean_std([run['test'] for run in runs[start]]):>18}"
              f"{'/'.join(str(r) if r is not None else f'>{args.steps}' for r in reached):>20}{minutes:>10.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
