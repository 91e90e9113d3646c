"""Side-by-side timing of SegmentationCollator against Mask2FormerImageProcessor on the same batch of crops.

Run from the repository root: ``python -m benchmarks.bench_collator [--batch_size 8 --repeats 5]``.
Every figure is the best of ``repeats`` runs after a warm-up call; absolute times move with the load of the machine.
The collator and the image processor are each timed in a fresh Python process of their own, started by this run:
timed one after the other in one process, whichever runs second is sped up by the allocator state the first left
behind (glibc raises its mmap threshold as large blocks are freed, so later allocations skip page faults), which
swung the image processor between 100 and 250 ms here. Both outputs are compared in this process, untimed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roadseg_utils.collator import SegmentationCollator, binary_masks, host_buffer_pool, present_classes
from roadseg_utils.labels import IGNORE_INDEX

GRID = (16, 32)
CONTENDERS = ("collator", "collator_without_reuse", "processor")
EXAMPLE_KEYS = ("batch_size", "height", "width", "num_classes", "classes_per_image", "seed")
IGNORED_CELL_SHARE = 0.05


def make_examples(
    batch_size: int, height: int, width: int, num_classes: int, classes_per_image: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Transformed-looking examples: blocky label maps with ``classes_per_image`` classes each, plus some 255."""
    if classes_per_image > num_classes:
        raise ValueError(f"classes_per_image ({classes_per_image}) exceeds num_classes ({num_classes})")
    rng = np.random.default_rng(seed)
    grid_h, grid_w = GRID
    examples = []
    for _ in range(batch_size):
        classes = rng.choice(num_classes, size=classes_per_image, replace=False)
        cells = np.concatenate([classes, rng.choice(classes, size=grid_h * grid_w - classes_per_image)])
        cells = rng.permutation(cells).astype(np.uint8)
        ignored = rng.random(cells.size) < IGNORED_CELL_SHARE
        ignored[: classes_per_image] = False
        cells[ignored] = IGNORE_INDEX
        coarse = cells.reshape(grid_h, grid_w)
        rows = np.arange(height) * grid_h // height
        cols = np.arange(width) * grid_w // width
        label = np.ascontiguousarray(coarse[rows[:, None], cols[None, :]])
        examples.append(
            {
                "pixel_values": rng.standard_normal((3, height, width), dtype=np.float32),
                "label": label,
                "valid": np.ones((height, width), dtype=np.uint8),
            }
        )
    return examples


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Smallest wall time of ``repeats`` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def _processor_call(images: list[np.ndarray], labels: list[np.ndarray]) -> Callable[[], Any]:
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    processor = Mask2FormerImageProcessorPil(ignore_index=IGNORE_INDEX, do_reduce_labels=False)

    def run_processor() -> Any:
        # Same work as the collator: images already normalised by the transforms, only masks and stacking left.
        return processor(
            images=images,
            segmentation_maps=labels,
            do_resize=False,
            do_rescale=False,
            do_normalize=False,
            input_data_format="channels_first",
            return_tensors="pt",
        )

    return run_processor


def time_contender(contender: str, config: dict[str, int]) -> float:
    """Best time of ``contender`` (see ``CONTENDERS``) on the benchmark batch, in this process."""
    examples = make_examples(**{key: config[key] for key in EXAMPLE_KEYS})
    if contender in ("collator", "collator_without_reuse"):
        if contender == "collator_without_reuse":
            # A pool that keeps no released block: every batch gets fresh memory from the OS, as before the pool.
            host_buffer_pool().max_idle_blocks = 0
        collator = SegmentationCollator(num_labels=config["num_classes"])
        return best_time(lambda: collator(examples), config["repeats"])[0]
    images = [example["pixel_values"] for example in examples]
    labels = [example["label"] for example in examples]
    return best_time(_processor_call(images, labels), config["repeats"])[0]


def time_in_fresh_process(contender: str, config: dict[str, int]) -> float:
    """:func:`time_contender` run in a new Python process, so that no earlier allocation shapes its timing."""
    command = [sys.executable, "-m", "benchmarks.bench_collator", "--time_only", contender]
    for key, value in config.items():
        command += [f"--{key}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"timing {contender} in a fresh process failed:\n{done.stderr}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def bench_collator(
    batch_size: int = 8,
    height: int = 512,
    width: int = 1024,
    num_classes: int = 26,
    classes_per_image: int = 20,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Time our collator and the upstream image processor on one batch; assert identical masks and classes."""
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        convert_segmentation_map_to_binary_masks,
    )

    config = {
        "batch_size": batch_size,
        "height": height,
        "width": width,
        "num_classes": num_classes,
        "classes_per_image": classes_per_image,
        "repeats": repeats,
        "seed": seed,
    }
    collator_s = time_in_fresh_process("collator", config)
    no_reuse_s = time_in_fresh_process("collator_without_reuse", config)
    processor_s = time_in_fresh_process("processor", config)

    examples = make_examples(batch_size, height, width, num_classes, classes_per_image, seed)
    images = [example["pixel_values"] for example in examples]
    labels = [example["label"] for example in examples]
    batch = SegmentationCollator(num_labels=num_classes)(examples)
    encoded = _processor_call(images, labels)()
    for ours, theirs in zip(batch["mask_labels"], encoded["mask_labels"], strict=True):
        assert torch.equal(ours.to(torch.float32), theirs), "mask_labels differ from the image processor's"
    for ours, theirs in zip(batch["class_labels"], encoded["class_labels"], strict=True):
        assert torch.equal(ours, theirs), "class_labels differ from the image processor's"
    assert torch.equal(batch["pixel_values"], encoded["pixel_values"]), "pixel_values differ"
    assert torch.equal(batch["pixel_mask"], encoded["pixel_mask"]), "pixel_mask differs"

    label_tensors = [torch.from_numpy(label) for label in labels]
    unique_s, _ = best_time(lambda: [torch.unique(label) for label in label_tensors], repeats)
    histogram_s, _ = best_time(lambda: [present_classes(label) for label in labels], repeats)
    bool_masks_s, _ = best_time(lambda: [binary_masks(label, present_classes(label)) for label in labels], repeats)
    float_masks_s, _ = best_time(
        lambda: [binary_masks(label, present_classes(label)).to(torch.float32) for label in labels], repeats
    )
    upstream_masks_s, _ = best_time(
        lambda: [convert_segmentation_map_to_binary_masks(label, ignore_index=IGNORE_INDEX) for label in labels],
        repeats,
    )
    return {
        "batch_size": batch_size,
        "height": height,
        "width": width,
        "mean_masks_per_image": float(np.mean([len(classes) for classes in batch["class_labels"]])),
        "torch_threads": torch.get_num_threads(),
        "collator_s": collator_s,
        "processor_s": processor_s,
        "collator_speedup": processor_s / collator_s,
        "collator_without_reuse_s": no_reuse_s,
        "torch_unique_s": unique_s,
        "histogram_s": histogram_s,
        "bool_masks_s": bool_masks_s,
        "float32_masks_s": float_masks_s,
        "float32_over_bool": float_masks_s / bool_masks_s,
        "upstream_masks_s": upstream_masks_s,
        "mask_build_speedup": upstream_masks_s / bool_masks_s,
    }


def main() -> None:
    """Print the timings and ratios of one benchmark run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--num_classes", type=int, default=26)
    parser.add_argument("--classes_per_image", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time_only", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = vars(args)
    contender = config.pop("time_only")
    if contender:
        print(json.dumps({"seconds": time_contender(contender, config)}))
        return
    result = bench_collator(**config)
    print(
        f"batch {result['batch_size']} x {result['height']}x{result['width']}, "
        f"{result['mean_masks_per_image']:.1f} masks per image, torch threads {result['torch_threads']}, "
        f"best of {args.repeats}"
    )
    print(f"{'step':<52}{'time (ms)':>12}")
    rows = [
        ("SegmentationCollator (bool masks), own process", result["collator_s"]),
        ("Mask2FormerImageProcessorPil, own process", result["processor_s"]),
        ("SegmentationCollator, no memory reuse, own process", result["collator_without_reuse_s"]),
        ("present classes: torch.unique", result["torch_unique_s"]),
        ("present classes: 256-bin histogram", result["histogram_s"]),
        ("masks built as bool (histogram + comparison)", result["bool_masks_s"]),
        ("masks built as float32 (same, then cast)", result["float32_masks_s"]),
        ("masks built upstream (np.unique, float32)", result["upstream_masks_s"]),
    ]
    for name, seconds in rows:
        print(f"{name:<52}{seconds * 1000:>12.1f}")
    print(f"collator speed-up over the image processor: {result['collator_speedup']:.1f}x (target >= 5x)")
    print(f"memory reuse speed-up: {result['collator_without_reuse_s'] / result['collator_s']:.1f}x")
    print(f"mask building speed-up over upstream: {result['mask_build_speedup']:.1f}x")
    print(f"torch.unique / histogram: {result['torch_unique_s'] / result['histogram_s']:.1f}x")
    print(f"float32 / bool mask build: {result['float32_over_bool']:.1f}x")
    print("masks, classes, pixel values and pixel mask identical to the image processor's: yes")


if __name__ == "__main__":
    main()
