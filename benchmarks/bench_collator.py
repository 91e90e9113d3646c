"""Side-by-side timing of SegmentationCollator against Mask2FormerImageProcessor on the same batch of crops.

Run from the repository root: ``python -m benchmarks.bench_collator [--batch_size 8 --repeats 5]``.
Every figure is the best of ``repeats`` runs after a warm-up call; absolute times move with the load of the machine.
The collator and the image processor are each timed in a fresh Python process of their own, started by this run
(see `benchmarks.collator_vs_processor` for why); both outputs are compared in this process, untimed. The steps
inside the collator (finding the present classes, building the masks) are timed in this process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.collator_vs_processor import compare_with_processor, make_examples
from benchmarks.timing import time_passes
from roadseg_utils.collator import binary_masks, present_classes
from roadseg_utils.labels import IGNORE_INDEX


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    return time_passes(fn, repeats, warmup=fn).min


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

    compared = compare_with_processor(batch_size, height, width, num_classes, classes_per_image, repeats, seed)
    examples = make_examples(batch_size, height, width, num_classes, classes_per_image, seed)
    labels = [example["label"] for example in examples]
    label_tensors = [torch.from_numpy(label) for label in labels]
    unique_s = best_time(lambda: [torch.unique(label) for label in label_tensors], repeats)
    histogram_s = best_time(lambda: [present_classes(label) for label in labels], repeats)
    bool_masks_s = best_time(lambda: [binary_masks(label, present_classes(label)) for label in labels], repeats)
    float_masks_s = best_time(
        lambda: [binary_masks(label, present_classes(label)).to(torch.float32) for label in labels], repeats
    )
    upstream_masks_s = best_time(
        lambda: [convert_segmentation_map_to_binary_masks(label, ignore_index=IGNORE_INDEX) for label in labels],
        repeats,
    )
    return {
        "batch_size": batch_size,
        "height": height,
        "width": width,
        "mean_masks_per_image": compared["mean_masks_per_image"],
        "torch_threads": torch.get_num_threads(),
        "collator_s": compared["collator_s"],
        "processor_s": compared["processor_s"],
        "collator_speedup": compared["collator_speedup"],
        "collator_without_reuse_s": compared["collator_without_reuse_s"],
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
    args = parser.parse_args()
    result = bench_collator(**vars(args))
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
