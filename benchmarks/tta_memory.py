"""Multi-scale and flip test-time augmentation on 1080x1920 frames: time and peak memory per image, side by side.

Run from the repository root: ``python -m benchmarks.tta_memory [--shortest_edges 512,1080 --repeats 2 --threads 1]``.

One synthetic 1080x1920 scene goes through the image processor (shortest edge 512 and 1080) and the tiny
Mask2Former, and `roadseg_utils.inference.predict_batch` (run_eval.py's path) turns it into a 1080x1920 label map in
five configurations: single-scale, flip, the papers' six scales (0.5-1.75), and six scales + flip, both with the
views above scale 1 run in strips no larger than the single-scale input (run_eval.py's default), and six scales +
flip with every view run whole (``--tta_tiling False``). Each configuration runs in a fresh Python process, so the
memory figures are its own:

- peak RSS: the process's peak resident memory (``ru_maxrss``) minus its resident memory with the model and the
  input ready (after a warm-up on a 64x64 input, so thread pools and lazy initialisation are in the baseline). It
  is what the operating system sees, allocator caching included; tracemalloc would not see torch's allocations.
- torch peak: the largest sum of live torch allocations during one prediction, from the profiler's memory events
  (``profile_memory=True``), split into the largest forward pass's own transient memory (on top of what was live
  when it started, also shown) and the peak outside the forward passes (resizing the input to each scale, and the
  post-processing: 384x384 scores, the final resize and argmax at 1080x1920). On CUDA the torch peak is
  ``torch.cuda.max_memory_allocated`` instead, without the split.

Time is the wall time of the fastest of ``--repeats`` predictions after one warm-up prediction, with its CPU
seconds (all threads) beside it: on a busy machine the fastest pass is the one least slowed by other processes, and
the CPU seconds move less than the wall time. Absolute times move with the load of the machine, which is printed;
``--threads 1`` makes a loaded 2-core machine's figures steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from benchmarks.timing import peak_mb, resident_mb, time_passes
from roadseg_utils.inference import predict_batch
from roadseg_utils.labels import idd_label_set
from roadseg_utils.modeling import TINY_MODEL, load_image_processor, load_model
from roadseg_utils.synthetic import generate_synthetic_idd
from roadseg_utils.transforms import make_eval_transform

FRAME = (1080, 1920)
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# name: (tta, scales, views above scale 1 in strips)
CONFIGURATIONS = {
    "single-scale": ("none", None, True),
    "flip": ("flip", None, True),
    "6 scales": ("none", PAPER_SCALES, True),
    "6 scales + flip": ("flip", PAPER_SCALES, True),
    "6 + flip whole": ("flip", PAPER_SCALES, False),
}
FORWARD = "model forward"
TARGET_RATIO = 1.5
MIB = 2**20


class AnnotatedForward(torch.nn.Module):
    """The model, each forward pass marked in the profiler, so memory can be told apart from post-processing's."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Any:
        """The model's forward pass inside a profiler range."""
        with torch.profiler.record_function(FORWARD):
            return self.model(**inputs)


def frame_batch(frame_dir: str, shortest_edge: int) -> dict[str, Any]:
    """The scene as run_eval.py feeds it: the image processor's input at ``shortest_edge``, the original labels."""
    image_path = next(Path(frame_dir).rglob("*_leftImg8bit.png"))
    label_path = next(Path(frame_dir).rglob("*_gtFine_labellevel3Ids.png"))
    rgb, label = np.array(Image.open(image_path).convert("RGB")), np.array(Image.open(label_path))
    processor = load_image_processor(TINY_MODEL, shortest_edge=shortest_edge)
    pixel_values, _, valid = make_eval_transform(processor).prepare(rgb, label)
    return {"pixel_values": torch.from_numpy(pixel_values)[None], "pixel_mask": torch.from_numpy(valid)[None].long(),
            "original_segmentation_maps": [label]}


def torch_memory_peaks(run: Any) -> dict[str, float]:
    """Peak live torch allocations (MiB) of one ``run()``: overall, the largest forward's own, post-processing's."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        run()
    events = profiler.profiler.kineto_results.events()
    memory = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    windows = sorted((event.start_ns(), event.end_ns()) for event in events if event.name() == FORWARD)
    times = np.array([t for t, _ in memory], dtype=np.int64)
    # Live bytes after each allocation or free, counted from what was live when the prediction started.
    live = np.cumsum([n for _, n in memory], dtype=np.int64)
    inside = np.zeros(len(times), dtype=bool)
    largest_forward = held_then = 0
    for start, end in windows:
        here = (times >= start) & (times <= end)
        inside |= here
        before = live[times < start][-1] if (times < start).any() else 0
        own = (live[here].max() if here.any() else before) - before
        if own > largest_forward:
            largest_forward, held_then = own, before
    return {
        "torch_peak_mb": max(int(live.max(initial=0)), 0) / MIB,
        "largest_forward_mb": largest_forward / MIB,
        "held_at_largest_forward_mb": held_then / MIB,
        "post_processing_peak_mb": max(int(live[~inside].max(initial=0)), 0) / MIB,
        "forward_passes": len(windows),
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one configuration's predictions and read its peak memory (run in a fresh process)."""
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    accelerator = Accelerator()
    cuda = accelerator.device.type == "cuda"
    model = load_model(TINY_MODEL, idd_label_set(3)).to(accelerator.device).eval()
    batch = frame_batch(spec["frame_dir"], spec["shortest_edge"])
    tta, scales, tile = CONFIGURATIONS[spec["configuration"]]

    def predict(on: torch.nn.Module = model, inputs: dict[str, Any] = batch) -> list[torch.Tensor]:
        with torch.inference_mode():
            maps = predict_batch(on, inputs, accelerator, tta, scales=scales, tile=tile)
        if cuda:
            torch.cuda.synchronize()
        return maps

    small = {"pixel_values": batch["pixel_values"][..., :64, :64], "pixel_mask": batch["pixel_mask"][..., :64, :64],
             "original_segmentation_maps": [np.zeros((64, 64), dtype=np.uint8)]}
    predict(inputs=small)
    ready_mb = resident_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    timing = time_passes(predict, spec["repeats"], warmup=predict)
    result = {
        "input": list(batch["pixel_values"].shape[-2:]),
        "time_s": timing.min,
        "cpu_s": timing.cpu_of_fastest,
        "times_s": [round(t, 2) for t in [timing.warmup_s, *timing.wall_s]],
        "ready_rss_mb": ready_mb,
        "peak_rss_mb": peak_mb(),
        "rss_delta_mb": peak_mb() - ready_mb,
        "classes": len(torch.unique(timing.result[0])),
    }
    if cuda:
        result["torch_peak_mb"] = (torch.cuda.max_memory_allocated() - allocated) / MIB
    else:
        result.update(torch_memory_peaks(lambda: predict(AnnotatedForward(model))))
    return result


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure` in a fresh interpreter; a failure (an out-of-memory kill included) is reported, not raised."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.tta_memory", "--measure", json.dumps(spec)], capture_output=True, text=True
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        reason = (completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1]
        return {"error": reason}
    return json.loads(lines[-1])


def print_table(shortest_edge: int, results: dict[str, dict[str, Any]]) -> None:
    """One edge's configurations side by side, with their ratios to single-scale."""
    base = results["single-scale"]
    if "error" in base:
        print(f"\nshortest edge {shortest_edge}: single-scale did not run: {base['error']}")
        return
    height, width = base["input"]
    print(f"\nshortest edge {shortest_edge}: model input {height}x{width}, label map {FRAME[0]}x{FRAME[1]}, batch 1")
    header = (f"{'configuration':<17}{'passes':>7}{'time/img s':>11}{'x':>6}{'CPU s':>7}{'RSS peak MiB':>13}{'x':>6}"
              f"{'torch peak MiB':>15}{'x':>6}{'largest fwd':>12}{'held then':>10}{'outside fwd':>12}")
    print(header)
    for name, result in results.items():
        if "error" in result:
            print(f"{name:<17} did not run: {result['error']}")
            continue
        split = ""
        if "largest_forward_mb" in result:
            split = (f"{result['largest_forward_mb']:>12.0f}{result['held_at_largest_forward_mb']:>10.0f}"
                     f"{result['post_processing_peak_mb']:>12.0f}")
        print(f"{name:<17}{result.get('forward_passes', ''):>7}{result['time_s']:>11.2f}"
              f"{result['time_s'] / base['time_s']:>6.1f}{result['cpu_s']:>7.2f}{result['rss_delta_mb']:>13.0f}"
              f"{result['rss_delta_mb'] / base['rss_delta_mb']:>6.2f}{result['torch_peak_mb']:>15.0f}"
              f"{result['torch_peak_mb'] / base['torch_peak_mb']:>6.2f}{split}")
    widest = results.get("6 scales + flip", {})
    if "error" not in widest:
        ratio = widest["torch_peak_mb"] / base["torch_peak_mb"]
        rss_ratio = widest["rss_delta_mb"] / base["rss_delta_mb"]
        verdict = "within" if max(ratio, rss_ratio) <= TARGET_RATIO else "NOT within"
        print(f"6 scales + flip / single-scale: torch peak {ratio:.2f}x, RSS peak {rss_ratio:.2f}x: {verdict} the "
              f"{TARGET_RATIO}x target")
        if "largest_forward_mb" in widest:
            whole = results.get("6 + flip whole", {})
            whole_text = (f", each view whole {whole['largest_forward_mb']:.0f} MiB (scale {max(PAPER_SCALES)}, "
                          f"{max(PAPER_SCALES) ** 2:.2f}x the pixels)" if "largest_forward_mb" in whole else "")
            print(f"  largest forward pass: single-scale {base['largest_forward_mb']:.0f} MiB, 6 scales + flip in "
                  f"strips {widest['largest_forward_mb']:.0f} MiB on top of {widest['held_at_largest_forward_mb']:.0f}"
                  f" MiB held (the 384x384 sums, the scaled input, the stitched scores){whole_text}; outside the "
                  f"forward passes: single-scale {base['post_processing_peak_mb']:.0f} MiB, 6 scales + flip "
                  f"{widest['post_processing_peak_mb']:.0f} MiB")

def main() -> None:
    """Measure every configuration at each shortest edge in its own process and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shortest_edges", default="512,1080", help="Image-processor shortest edges to run.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed predictions after the warm-up.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: torch's default).")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS),
                        help=f"Comma-separated subset of: {', '.join(CONFIGURATIONS)}.")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    names = [name.strip() for name in args.configurations.split(",")]
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if unknown or "single-scale" not in names:
        parser.error(f"--configurations: unknown {unknown}, or single-scale (the reference) left out")
    print(f"load average at start: {os.getloadavg()}, CPU cores: {os.cpu_count()}, torch threads: "
          f"{args.threads or torch.get_num_threads()}, device: {'cuda' if torch.cuda.is_available() else 'cpu'}",
          flush=True)
    with tempfile.TemporaryDirectory() as frame_dir:
        generate_synthetic_idd(frame_dir, 1, 1, FRAME, seed=0, workers=1)
        for edge in (int(edge) for edge in args.shortest_edges.split(",")):
            results = {}
            for name in names:
                spec = {"frame_dir": frame_dir, "shortest_edge": edge, "configuration": name,
                        "repeats": args.repeats, "threads": args.threads}
                results[name] = run_isolated(spec)
                print(f"  {edge} {name}: {json.dumps(results[name])}", flush=True)
            print_table(edge, results)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
