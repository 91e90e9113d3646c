"""Frozen against full fine-tuning (step time, peak memory), the collator against the image processor, and the data
loader against the frozen step rate, side by side in one run.

Run from the repository root: ``python -m benchmarks.bench_finetune [--batch_size 8 --crop_size 512x1024]``.

Each training configuration runs in a fresh Python process, so its peak resident memory (``ru_maxrss``) is its own;
the "step memory" is that peak minus the resident memory with the model and batch ready, i.e. what the training
steps themselves add (activations kept for backward, gradients, optimizer state). A step is forward, loss, backward
and an AdamW update on one real batch of synthetic scenes (the first step is a warm-up and is not timed); frozen
means the backbone and pixel decoder are frozen and locked in eval mode, as `FrozenBackboneTrainer` does. The
Swin-S-sized configuration is the architecture of facebook/mask2former-swin-small-cityscapes-semantic, randomly
initialised (no download). Absolute times move with the load of the machine, which is printed; the ratios compare
runs made minutes apart on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.collator_vs_processor import compare_with_processor
from benchmarks.timing import peak_mb, resident_mb, time_passes
from roadseg_utils.cli import parse_size
from roadseg_utils.collator import SegmentationCollator
from roadseg_utils.data import DataSourceArguments, load_segmentation_dataset, with_sample_transform
from roadseg_utils.freezing import DEFAULT_FROZEN_PARTS, freeze, frozen_modules, lock_eval_mode
from roadseg_utils.labels import idd_label_set
from roadseg_utils.modeling import TINY_MODEL, load_image_processor, load_model
from roadseg_utils.synthetic import generate_synthetic_idd
from roadseg_utils.trainer import EpochSeededDataset
from roadseg_utils.transforms import build_train_transforms, make_transform_fn

DEFAULT_DATA_DIR = "data/bench_finetune_1080p"
DEFAULT_DATA_IMAGES = 32
SWIN_S = "swin-s"


def ensure_scenes(data_dir: str, num_images: int) -> str:
    """``data_dir``, filled with 1080x1920 synthetic scenes first if it holds none."""
    if not (Path(data_dir) / "leftImg8bit").is_dir():
        print(f"writing {num_images} synthetic 1080x1920 scenes to {data_dir} (once)", flush=True)
        generate_synthetic_idd(data_dir, num_images=num_images, num_sequences=4, image_size=(1080, 1920), seed=0)
    return data_dir


def train_dataset(data_dir: str, crop: tuple[int, int], seed: int = 0) -> EpochSeededDataset:
    """The training rows of ``data_dir`` with the training transform at ``crop`` (as run_finetune.py builds them)."""
    label_set = idd_label_set(3)
    args = DataSourceArguments(data_dir=data_dir, train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    rows = load_segmentation_dataset(args, label_set, seed=seed)["train"]
    processor = load_image_processor(TINY_MODEL)
    transform = build_train_transforms(crop, processor.image_mean, processor.image_std)
    return EpochSeededDataset(with_sample_transform(rows, make_transform_fn(transform, keep_originals=False)), seed)


def build_model(model_name: str) -> Any:
    """The tiny model or a randomly initialised Swin-S-sized Mask2Former for the level-3 IDD labels."""
    label_set = idd_label_set(3)
    if model_name == SWIN_S:
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        # Mask2FormerConfig's defaults are the Swin-S Cityscapes architecture (embed 96, depths 2-2-18-2, 100 queries).
        config = Mask2FormerConfig(id2label=dict(label_set.id2label), label2id=label_set.label2id)
        return Mask2FormerForUniversalSegmentation(config)
    return load_model(TINY_MODEL, label_set)


def measure_training(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``spec['steps']`` training steps (after one warm-up) and read the process's peak memory."""
    torch.manual_seed(0)
    crop = parse_size(spec["crop_size"])
    dataset = train_dataset(spec["data_dir"], crop)
    examples = [dataset[i % len(dataset)] for i in range(spec["batch_size"])]
    batch = SegmentationCollator(num_labels=26)(examples)
    model = build_model(spec["model"])
    parts = DEFAULT_FROZEN_PARTS if spec["frozen"] else ()
    counts = freeze(model, parts)
    lock_eval_mode(frozen_modules(model, parts))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
    inputs = {
        "pixel_values": batch["pixel_values"],
        "pixel_mask": batch["pixel_mask"],
        "class_labels": batch["class_labels"],
    }
    ready_mb = resident_mb()

    def step() -> None:
        loss = model(**inputs, mask_labels=[masks.to(torch.float32) for masks in batch["mask_labels"]]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_passes(step, spec["steps"], warmup=step)
    return {
        **counts,
        "step_s": timing.median,
        "step_times_s": [round(t, 3) for t in [timing.warmup_s, *timing.wall_s]],
        "ready_rss_mb": ready_mb,
        "peak_rss_mb": peak_mb(),
        "step_memory_mb": peak_mb() - ready_mb,
        "masks_per_image": sum(len(c) for c in batch["class_labels"]) / len(examples),
    }


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure_training` in a fresh interpreter; an out-of-memory kill is reported instead of raised."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_finetune", "--measure", json.dumps(spec)],
        capture_output=True, text=True,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        reason = (completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1]
        return {"error": reason}
    return json.loads(lines[-1])


def loader_rate(data_dir: str, crop: tuple[int, int], batch_size: int, workers: int, batches: int) -> dict[str, float]:
    """Batches per second a DataLoader with ``workers`` processes delivers (start-up timed apart)."""
    dataset = train_dataset(data_dir, crop)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=(batches + 1) * batch_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=SegmentationCollator(num_labels=26), persistent_workers=False,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    count = sum(1 for _ in iterator)
    steady_s = time.perf_counter() - start
    return {"batches_per_s": count / steady_s, "first_batch_s": first_s, "batches": count}


def print_training_table(title: str, frozen: dict[str, Any], full: dict[str, Any]) -> None:
    """Frozen and full side by side, with the ratios the targets are about."""
    print(f"\n{title}")
    if "error" in frozen or "error" in full:
        print(f"  did not run: {frozen.get('error') or full.get('error')}")
        return
    print(f"  {'':<28}{'frozen':>14}{'full':>14}")
    rows = [
        ("trainable parameters", "trainable_parameters", "{:,.0f}"),
        ("step time (median, s)", "step_s", "{:.3f}"),
        ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"),
        ("step memory (MiB)", "step_memory_mb", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:<28}{fmt.format(frozen[key]):>14}{fmt.format(full[key]):>14}")
    print(f"  step times frozen: {frozen['step_times_s']}  full: {full['step_times_s']}")
    print(f"  speed-up of freezing: {full['step_s'] / frozen['step_s']:.2f}x (target >= 2.5x on the tiny config)")
    print(f"  step memory frozen / full: {frozen['step_memory_mb'] / full['step_memory_mb']:.2f} "
          f"(target <= 0.6 on the tiny config); peak RSS frozen / full: "
          f"{frozen['peak_rss_mb'] / full['peak_rss_mb']:.2f}")


def main() -> None:
    """Run every measurement and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", default="512x1024")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--swin_s_batch_size", type=int, default=2)
    parser.add_argument("--swin_s_crop_size", default="512x1024")
    parser.add_argument("--swin_s_steps", type=int, default=2)
    parser.add_argument("--skip_swin_s", action="store_true")
    parser.add_argument("--loader_batches", type=int, default=12)
    parser.add_argument("--loader_workers", type=int, default=2)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_training(json.loads(args.measure))))
        return

    print(f"load average at start: {os.getloadavg()}, CPU cores: {os.cpu_count()}, "
          f"torch threads: {torch.get_num_threads()}", flush=True)
    data_dir = ensure_scenes(args.data_dir, DEFAULT_DATA_IMAGES)
    tiny = {"model": TINY_MODEL, "data_dir": data_dir, "batch_size": args.batch_size, "crop_size": args.crop_size,
            "steps": args.steps}
    tiny_frozen, tiny_full = run_isolated({**tiny, "frozen": True}), run_isolated({**tiny, "frozen": False})
    print_training_table(f"tiny Mask2Former, batch {args.batch_size} x {args.crop_size}, {args.steps} timed steps",
                         tiny_frozen, tiny_full)
    if not args.skip_swin_s:
        swin = {"model": SWIN_S, "data_dir": data_dir, "batch_size": args.swin_s_batch_size,
                "crop_size": args.swin_s_crop_size, "steps": args.swin_s_steps}
        print_training_table(
            f"Swin-S-sized Mask2Former, batch {args.swin_s_batch_size} x {args.swin_s_crop_size}, "
            f"{args.swin_s_steps} timed steps",
            run_isolated({**swin, "frozen": True}), run_isolated({**swin, "frozen": False}),
        )

    height, width = parse_size(args.crop_size)
    collated = compare_with_processor(batch_size=args.batch_size, height=height, width=width)
    print(f"\ncollator against Mask2FormerImageProcessor, batch {args.batch_size} x {args.crop_size} "
          f"({collated['mean_masks_per_image']:.1f} masks per image, identical masks and classes)")
    print(f"  SegmentationCollator {collated['collator_s'] * 1000:.1f} ms, image processor "
          f"{collated['processor_s'] * 1000:.1f} ms: {collated['collator_speedup']:.1f}x (target >= 5x)")

    loader = loader_rate(data_dir, parse_size(args.crop_size), args.batch_size, args.loader_workers,
                         args.loader_batches)
    print(f"\ndata loader, {args.loader_workers} workers, batch {args.batch_size} x {args.crop_size} from 1080x1920 "
          f"PNG scenes (measured alone, not during training)")
    print(f"  delivers {loader['batches_per_s']:.2f} batches/s over {loader['batches']} batches "
          f"(first batch after {loader['first_batch_s']:.1f} s of start-up)")
    if "error" not in tiny_frozen:
        step_rate = 1 / tiny_frozen["step_s"]
        verdict = "keeps up" if loader["batches_per_s"] > step_rate else "does NOT keep up"
        print(f"  frozen tiny step consumes {step_rate:.2f} batches/s: the loader {verdict} "
              f"({loader['batches_per_s'] / step_rate:.2f}x)")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
