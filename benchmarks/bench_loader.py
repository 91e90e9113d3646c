"""The training loader's batches/s at 1080x1920 -> 512x1024 crops per worker count, beside an assumed GPU step.

Run from the repository root: ``python -m benchmarks.bench_loader [--batch_size 8 --batches 6]``.

For 1, 2, ... up to the usable cores (and the default, `parallel.default_loader_workers`), the DataLoader of
run_finetune.py's training rows (decode, scale jitter, crop, flip, normalise, the six-key collator) is timed with
OpenCV's default thread pool in every worker, and with one OpenCV thread per worker (`parallel.limit_loader_threads`,
what the scripts do). The step the loader has to keep up with is not measured here (no GPU): it is derived from
mmsegmentation's published Mask2Former Swin-S Cityscapes figures, as `ASSUMED_STEP` explains.
"""

from __future__ import annotations

import argparse
import os

import cv2

from benchmarks.bench_finetune import DEFAULT_DATA_DIR, DEFAULT_DATA_IMAGES, ensure_scenes, loader_rate
from roadseg_utils.parallel import default_loader_workers, usable_cores

# Seconds of one Mask2Former Swin-S training step at batch 8 of 512x1024 crops on one A100, derived (not measured):
# mmsegmentation's configs/mask2former/README.md gives 5.57 images/s for Swin-S inference at 1024x2048 on an A100,
# 0.18 s an image, so ~0.045 s per 512x1024 crop (a quarter of the pixels); forward + backward ~ 3x the forward pass;
# 8 crops: 8 x 0.045 x 3 ~ 1.1 s. A T4 (Colab, Kaggle) is taken as ~4x slower (8.1 vs 19.5 fp32 TFLOPS, 65 vs 312
# fp16 tensor TFLOPS): ~4.4 s. The frozen backbone and pixel decoder of the seed baseline make the step shorter.
ASSUMED_STEP = {"A100": 1.1, "T4": 4.4}


def main() -> None:
    """Time the loader per worker count and thread setting, and print it beside the assumed steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    data_dir = ensure_scenes(args.data_dir, DEFAULT_DATA_IMAGES)
    cores = usable_cores()
    counts = sorted({*range(1, cores + 1), default_loader_workers()})
    default_threads = cv2.getNumThreads()
    load_before = os.getloadavg()
    rows = []
    for workers in counts:
        cv2.setNumThreads(default_threads)
        pooled = loader_rate(data_dir, (512, 1024), args.batch_size, workers, args.batches)
        cv2.setNumThreads(1)
        single = loader_rate(data_dir, (512, 1024), args.batch_size, workers, args.batches)
        rows.append((workers, pooled, single))
    load_after = os.getloadavg()

    print(f"\ntraining loader, batch {args.batch_size} of 512x1024 crops from 1080x1920, {cores} cores, "
          f"{args.batches} batches each (first batch timed apart); load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; default workers here: {default_loader_workers()}")
    print(f"{'workers':>8s} {f'OpenCV threads {default_threads}: batches/s':>32s} {'1 per worker: batches/s':>25s} "
          f"{'first batch (s)':>16s}")
    for workers, pooled, single in rows:
        print(f"{workers:8d} {pooled['batches_per_s']:32.2f} {single['batches_per_s']:25.2f} "
              f"{single['first_batch_s']:16.1f}")
    best = max(single["batches_per_s"] for _, _, single in rows)
    for gpu, step in ASSUMED_STEP.items():
        need = 1 / step
        verdict = "keeps up" if best >= need else "does NOT keep up"
        print(f"assumed Swin-S Mask2Former step on one {gpu}: {step:.1f} s at batch 8 -> {need:.2f} batches/s needed; "
              f"the best loader here ({best:.2f} batches/s) {verdict} ({best / need:.2f}x)")


if __name__ == "__main__":
    main()
