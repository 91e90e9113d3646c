"""The model pass of run_selection.py --label_source model against a bare batched forward of the same model.

Times, per image, on the same images at the same reduced size and batch size:

- **model pass**: `compute_model_scores` with an empty cache: files decoded at the reduced size (one batch ahead,
  in a thread), batched, the forward pass, the histograms, entropy and pooled embeddings, and the cache written;
- **bare forward**: only ``model(pixel_values, pixel_mask)`` under ``torch.inference_mode()`` on batches decoded
  and stacked beforehand (no file reading, no statistics);
- **decode + bare forward**: the same forward with each batch decoded just before it, in the same thread.

The target is model pass <= 1.3x bare forward. Passes are interleaved, the fastest of --repeats is reported, with
its CPU seconds (all threads: the decoding thread's work shows there even when it overlaps the forward pass).

Then a rerun of run_selection.py with other weights, everything cached, from labels and from the model's
predictions (in process, imports excluded), and whether the model was loaded for it.

    python -m benchmarks.selection_model_pass [--num_images 64] [--prediction_size 256] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import logging as std_logging
import tempfile
from functools import partial
from pathlib import Path

import torch

import run_selection
from roadseg_utils.data import DataSourceArguments
from roadseg_utils.labels import idd_label_set
from roadseg_utils.modeling import load_model
from roadseg_utils.selection import compute_model_scores, load_candidate_pool
from roadseg_utils.selection.model_scores import decode_reduced, stack_batch
from roadseg_utils.synthetic import generate_synthetic_idd

from .timing import time_passes

MEAN = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
STD = torch.tensor((0.229, 0.224, 0.225))[:, None, None]


def main() -> None:
    """Generate the images, time the three passes interleaved, and print them side by side with the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--image_size", default="360x640", help="synthetic frames (the demo's size)")
    parser.add_argument("--prediction_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    label_set = idd_label_set(3)
    torch.manual_seed(0)
    model = load_model("tiny", label_set).eval()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        generate_synthetic_idd(root / "data", args.num_images, 4, args.image_size, seed=0)
        pool = load_candidate_pool(DataSourceArguments(data_dir=str(root / "data")), label_set)
        files = pool.image_sources()
        chunks = [files[i: i + args.batch_size] for i in range(0, len(files), args.batch_size)]
        batches = [stack_batch([decode_reduced(f, args.prediction_size) for f in chunk], MEAN, STD)
                   for chunk in chunks]

        def bare() -> None:
            with torch.inference_mode():
                for pixels, mask in batches:
                    model(pixel_values=pixels, pixel_mask=mask)

        def decode_and_bare() -> None:
            with torch.inference_mode():
                for chunk in chunks:
                    pixels, mask = stack_batch([decode_reduced(f, args.prediction_size) for f in chunk], MEAN, STD)
                    model(pixel_values=pixels, pixel_mask=mask)

        passes = iter(range(10**6))

        def model_pass() -> None:
            cache = root / f"cache{next(passes)}"  # empty every time: every image inferred
            scores = compute_model_scores(pool, label_set, "tiny", cache, lambda: model, args.batch_size,
                                          args.prediction_size, "fp32")
            assert scores.inferred == len(files)

        bare()  # warm-up: first-call allocations
        timings: dict[str, list[tuple[float, float]]] = {"model pass": [], "bare forward": [],
                                                         "decode + bare forward": []}
        for _ in range(args.repeats):
            for name, run in (("model pass", model_pass), ("bare forward", bare),
                              ("decode + bare forward", decode_and_bare)):
                timing = time_passes(run, 1)
                timings[name].append((timing.min, timing.cpu_of_fastest))
        reruns = _cached_reruns(root / "data", root / "runs", args)
    best = {name: min(values)[0] for name, values in timings.items()}
    cpu = {name: min(values)[1] for name, values in timings.items()}
    print(f"{len(files)} images of {args.image_size}, shortest edge {args.prediction_size}, batch {args.batch_size}, "
          f"tiny model, {args.threads} torch thread(s), fastest of {args.repeats}")
    print("bare forward = model(pixel_values, pixel_mask) under inference_mode on batches decoded, resized, normalised "
          "and stacked beforehand; model pass = decode (one batch ahead, in a thread) + forward + histograms, "
          "entropy, embeddings + cache write")
    print(f"{'pass':<24}{'ms/image':>10}{'vs bare':>10}{'vs decode+bare':>16}{'CPU ms/image':>14}{'CPU vs bare':>13}")
    for name, seconds in best.items():
        print(f"{name:<24}{1000 * seconds / len(files):>10.2f}{seconds / best['bare forward']:>9.2f}x"
              f"{seconds / best['decode + bare forward']:>15.2f}x{1000 * cpu[name] / len(files):>14.2f}"
              f"{cpu[name] / cpu['bare forward']:>12.2f}x")
    ratio = best["model pass"] / best["bare forward"]
    print(f"target model pass <= 1.30x bare forward: {'met' if ratio <= 1.3 else 'NOT met'} ({ratio:.2f}x)")
    print(f"cached rerun with other weights ({len(files)} images), fastest of {args.repeats}: labels "
          f"{reruns['labels']:.3f} s, model predictions {reruns['model']:.3f} s "
          f"({reruns['model'] / reruns['labels']:.2f}x); model loaded in the rerun: {reruns['loaded']}")


def _select(data: Path, out: Path, alpha: float, extra: dict[str, object]) -> None:
    run_selection.run(run_selection.DataSourceArguments(data_dir=str(data)), run_selection.SelectionArguments(
        output_dir=str(out), num_images=10, alpha=alpha, beta=0.8 - alpha, plots=False, **extra))


def _cached_reruns(data: Path, runs: Path, args: argparse.Namespace) -> dict[str, float | bool]:
    """Fastest cached rerun of run_selection.run with other weights, from labels and from the model's predictions."""
    std_logging.disable(std_logging.WARNING)
    loads = []
    original = run_selection.load_model
    run_selection.load_model = lambda *a, **k: loads.append(a) or original(*a, **k)
    model = {"label_source": "model", "model_name_or_path": "tiny", "prediction_size": args.prediction_size,
             "per_device_batch_size": args.batch_size}
    try:
        seconds = {}
        for source, extra in (("labels", {}), ("model", model)):
            _select(data, runs / source, 0.4, extra)  # fills the caches
            loads.clear()
            seconds[source] = time_passes(partial(_select, data, runs / source, 0.1, extra), args.repeats).min
        return {**seconds, "loaded": bool(loads)}
    finally:
        run_selection.load_model = original
        std_logging.disable(std_logging.NOTSET)


if __name__ == "__main__":
    main()
