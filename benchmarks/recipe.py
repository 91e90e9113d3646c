"""Which parts of the fine-tuning recipe cost or buy mIoU: each factor changed alone, and a plain training loop.

Run from the repository root: ``python -m benchmarks.recipe [--steps 150 --seeds 0,1 --variants all]``.

Every variant starts from ``tiny-cityscapes`` with its encoder and pixel decoder frozen and the class head mapped,
trains for the same number of steps on the demo data, and is scored on the same test split by the same code
(``run_finetune.py``). The ``Trainer`` variants are ``run_finetune.py`` with the demo recipe (batch 8, 192x320 crops,
scale jitter 0.75-1.25, colour jitter, flips, gradients clipped at norm 1, constant lr, evaluation at shortest edge
192) and one change each. ``plain loop`` is a hand-written loop: whole images resized as for evaluation, no
augmentation, ``torch.optim.Adam`` at the same constant lr, no clipping; its weights are then scored by
``run_finetune.py --do_train False``. With several seeds each figure is the mean +- standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

import run_finetune
from benchmarks.training_runs import (
    ValidationCurve,
    chosen,
    demo_recipe,
    ensure_demo_data,
    mean_std,
    training_parser,
)
from roadseg_utils.collator import SegmentationCollator
from roadseg_utils.data import load_segmentation_dataset, source_label_set, with_sample_transform
from roadseg_utils.freezing import DEFAULT_FROZEN_PARTS, freeze, frozen_modules, lock_eval_mode
from roadseg_utils.modeling import load_image_processor, load_model
from roadseg_utils.transforms import make_eval_transform

PLAIN_LOOP = "plain loop"
VARIANTS: dict[str, list[str]] = {
    "demo recipe": [],
    "no colour jitter": ["--color_jitter_prob", "0"],
    "no scale jitter (1-1)": ["--min_scale", "1", "--max_scale", "1"],
    "scale jitter 0.5-2 (default)": ["--min_scale", "0.5", "--max_scale", "2"],
    "no gradient clipping": ["--max_grad_norm", "0"],
    "no augmentation or clipping": ["--color_jitter_prob", "0", "--min_scale", "1", "--max_scale", "1",
                                    "--max_grad_norm", "0"],
    "scale jitter 1-2": ["--min_scale", "1", "--max_scale", "2"],
    "10% warm-up + cosine": ["--warmup_steps", "0.1", "--lr_scheduler_type", "cosine"],
    "12544 sampled points": ["--loss_overrides", "train_num_points=12544"],
    "class weight 5 (2)": ["--loss_overrides", "class_weight=5"],
    "evaluation at 360 (192)": ["--eval_shortest_edge", "0"],
    PLAIN_LOOP: [],
}
MODEL = "tiny-cityscapes"


def run_trainer_variant(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """``run_finetune.py`` with the demo recipe and the variant's change: validation curve and test mIoU."""
    curve = ValidationCurve()
    output_dir = Path(args.work_dir) / f"{variant.split(' (')[0].replace(' ', '-')}-seed{seed}"
    results = run_finetune.main([
        "--model_name_or_path", MODEL, *demo_recipe(args, seed, output_dir, args.learning_rate),
        "--max_steps", str(args.steps), "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps),
        *VARIANTS[variant],
    ], callbacks=[curve])
    return {"curve": curve.points, "test": float(results["test_mean_iou"])}


def train_plain_loop(seed: int, args: argparse.Namespace, output_dir: Path) -> None:
    """Train the decoder and head by hand on whole resized images with Adam, then save model and processor."""
    _, data_args, _ = run_finetune.parse_arguments(
        ["--model_name_or_path", MODEL, *demo_recipe(args, seed, output_dir, args.learning_rate)]
    )
    set_seed(seed)
    label_set = source_label_set(data_args)
    model = load_model(MODEL, label_set)
    freeze(model, DEFAULT_FROZEN_PARTS)
    lock_eval_mode(frozen_modules(model, DEFAULT_FROZEN_PARTS))
    processor = load_image_processor(MODEL, shortest_edge=data_args.eval_edge)
    train_rows = load_segmentation_dataset(data_args, label_set, seed=seed)["train"]
    train = with_sample_transform(train_rows, make_eval_transform(processor, keep_originals=False))
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=SegmentationCollator(num_labels=label_set.num_labels),
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            masks = [mask.float() for mask in batch["mask_labels"]]
            loss = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], mask_labels=masks,
                         class_labels=batch["class_labels"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps:
                break
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def run_plain_loop(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The plain loop's weights, scored on the validation and test splits by ``run_finetune.py``."""
    weights = Path(args.work_dir) / f"plain-loop-seed{seed}"
    train_plain_loop(seed, args, weights)
    results = run_finetune.main([
        "--model_name_or_path", str(weights),
        *demo_recipe(args, seed, weights.with_name(weights.name + "-eval"), args.learning_rate),
        "--do_train", "False", "--eval_strategy", "no",
    ])
    return {"curve": [(args.steps, float(results["eval_mean_iou"]))], "test": float(results["test_mean_iou"])}


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the chosen variants for every seed and print test mIoU side by side."""
    parser = training_parser(__doc__.split("\n", 1)[0], "variants", list(VARIANTS), steps=150, eval_steps=50,
                             seeds="0,1", work_dir="runs/recipe")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    variants = chosen(parser, "variants", args.variants, list(VARIANTS))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    ensure_demo_data(args.data_dir)
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        runs[variant] = []
        for seed in seeds:
            began = time.perf_counter()
            run = run_plain_loop(seed, args) if variant == PLAIN_LOOP else run_trainer_variant(variant, seed, args)
            runs[variant].append({**run, "seconds": time.perf_counter() - began})
    print(f"\n{args.steps} steps, batch {args.batch_size}, crops {args.crop_size}, lr {args.learning_rate:g}, "
          f"seeds {args.seeds}, data {args.data_dir}, start {MODEL} (frozen encoder and pixel decoder, mapped head)")
    reference = "demo recipe" if "demo recipe" in runs else variants[0]
    baseline = statistics.mean(run["test"] for run in runs[reference])
    print(f"\n{'variant':<32}{'val mIoU @' + str(args.steps):>18}{'test mIoU @' + str(args.steps):>18}"
          f"{'test - ' + reference.split(' ')[0]:>13}{'minutes':>9}")
    for variant in variants:
        tests = [run["test"] for run in runs[variant]]
        minutes = statistics.mean(run["seconds"] for run in runs[variant]) / 60
        print(f"{variant:<32}{mean_std([run['curve'][-1][1] for run in runs[variant]]):>18}{mean_std(tests):>18}"
              f"{statistics.mean(tests) - baseline:>+13.3f}{minutes:>9.1f}")
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
