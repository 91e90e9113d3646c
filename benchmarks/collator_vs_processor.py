"""SegmentationCollator against Mask2FormerImageProcessor on one batch, each timed in a fresh process of its own.

Shared by ``bench_collator`` and ``bench_finetune``. Timed one after the other in one process, whichever runs second
is sped up by the allocator state the first left behind (glibc raises its mmap threshold as large blocks are freed,
so later allocations skip page faults), which more than doubled the image processor's speed in some runs here (see
BENCHMARKS.md). So each contender runs in a new interpreter started as ``python -m benchmarks.collator_vs_processor
CONTENDER CONFIG_JSON``, which prints its best time as JSON; the outputs are compared in the caller's process,
untimed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.timing import time_passes
from roadseg_utils.collator import SegmentationCollator, host_buffer_pool
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
    """Best time of ``contender`` (see ``CONTENDERS``) on the benchmark batch, in this process, after a warm-up."""
    examples = make_examples(**{key: config[key] for key in EXAMPLE_KEYS})
    if contender in ("collator", "collator_without_reuse"):
        if contender == "collator_without_reuse":
            # A pool that keeps no released block: every batch gets fresh memory from the OS, as before the pool.
            host_buffer_pool().max_idle_blocks = 0
        collator = SegmentationCollator(num_labels=config["num_classes"])
        return time_passes(lambda: collator(examples), config["repeats"], warmup=lambda: collator(examples)).min
    images = [example["pixel_values"] for example in examples]
    labels = [example["label"] for example in examples]
    run_processor = _processor_call(images, labels)
    return time_passes(run_processor, config["repeats"], warmup=run_processor).min


def time_in_fresh_process(contender: str, config: dict[str, int]) -> float:
    """:func:`time_contender` run in a new Python process, so that no earlier allocation shapes its timing."""
    command = [sys.executable, "-m", "benchmarks.collator_vs_processor", contender, json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"timing {contender} in a fresh process failed:\n{done.stderr}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def compare_with_processor(
    batch_size: int = 8,
    height: int = 512,
    width: int = 1024,
    num_classes: int = 26,
    classes_per_image: int = 20,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Best times of the collator (with and without reuse) and the image processor; asserts identical outputs."""
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
    return {
        "mean_masks_per_image": float(np.mean([len(classes) for classes in batch["class_labels"]])),
        "collator_s": collator_s,
        "processor_s": processor_s,
        "collator_speedup": processor_s / collator_s,
        "collator_without_reuse_s": no_reuse_s,
    }


def main() -> None:
    """Time one contender in this (fresh) process and print its best time as JSON."""
    parser = argparse.ArgumentParser(description="Time one contender of compare_with_processor in this process.")
    parser.add_argument("contender", choices=CONTENDERS)
    parser.add_argument("config", help="JSON object with the EXAMPLE_KEYS and repeats")
    args = parser.parse_args()
    print(json.dumps({"seconds": time_contender(args.contender, json.loads(args.config))}))


if __name__ == "__main__":
    main()
