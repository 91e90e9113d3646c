"""Timing of run_selection.py on full-size synthetic label maps, side by side in one process.

Run from the repository root: ``python -m benchmarks.bench_selection [--num_maps 500 --work_dir DIR]``.

(a) decoding every 1080x1920 label PNG with PIL in one process (the issue's reference; the selection itself decodes
    8-bit greyscale PNGs with OpenCV, so the same decode with OpenCV is printed beside it as (a'));
(b) the selection end to end (find files, histograms, scores, manifest, report, plots) in one process, no cache;
(c) the same with every core;
(d) a cached rerun with other weights; then the same on trees of 500 to 8,000 images, with the linear fit.

The maps are generated once by the synthetic module into ``--work_dir`` and reused by later runs. The larger trees
for (d) repeat the maps through symlinks in more sequence folders; their cache is filled from the real maps'
histograms (each link points at one of them) instead of decoding every link again, since (d) times the rerun,
not the first run. One warm-up run on a small tree loads every module first, so no figure includes imports (as (a)
excludes Python's start-up); the command-line wall time of a cached rerun, imports included, is printed separately.
CPU seconds (this process plus its workers) are printed for (b) and (c): on a loaded machine the wall-clock ratio
b/c says little, while equal CPU seconds show that the parallel path adds no work.
"""

from __future__ import annotations

import argparse
import logging as std_logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import run_selection
from benchmarks.timing import Timing, time_passes
from roadseg_utils.data import DataSourceArguments, label_cache
from roadseg_utils.data.label_cache import CACHE_FILE
from roadseg_utils.labels import get_label_set
from roadseg_utils.selection import SelectionArguments, compute_class_stats, load_candidate_pool
from roadseg_utils.synthetic import LABEL_SUFFIX, generate_synthetic_idd

FIT_SIZES = (500, 1000, 2000, 4000, 8000)
EXTRAPOLATE_TO = 8000
HEIGHT, WIDTH = 1080, 1920


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ensure_maps(work_dir: Path, num_maps: int) -> Path:
    """The synthetic IDD tree with ``num_maps`` 1080x1920 frames, generated on first use."""
    root = work_dir / f"data_{num_maps}"
    if len(list(root.glob(f"gtFine/train/*/*{LABEL_SUFFIX}"))) != num_maps:
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        generate_synthetic_idd(root, num_maps, max(1, num_maps // 25), (HEIGHT, WIDTH), seed=0)
        print(f"generated {num_maps} frames of {HEIGHT}x{WIDTH} in {time.perf_counter() - start:.0f} s -> {root}")
    return root


def symlink_tree(source: Path, target: Path, count: int) -> Path:
    """An IDD tree of ``count`` frames whose image and label map link to ``source``'s, repeated as needed.

    Copy r of the source's frames goes into sequence folders ``r<r>_<sequence>``.
    """
    if target.is_dir() and len(list(target.glob(f"gtFine/train/*/*{LABEL_SUFFIX}"))) == count:
        return target
    shutil.rmtree(target, ignore_errors=True)
    labels = sorted(source.glob(f"gtFine/train/*/*{LABEL_SUFFIX}"))
    for index in range(count):
        label = labels[index % len(labels)]
        sequence = f"r{index // len(labels)}_{label.parent.name}"
        frame = label.name[: -len(LABEL_SUFFIX)]
        image = source / "leftImg8bit" / "train" / label.parent.name / f"{frame}_leftImg8bit.png"
        for original, folder, suffix in ((label, "gtFine", LABEL_SUFFIX), (image, "leftImg8bit", "_leftImg8bit.png")):
            link = target / folder / "train" / sequence / f"{frame}{suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(original.resolve(), link)
    return target


@contextmanager
def histograms_from(known: dict[str, np.ndarray]) -> Iterator[None]:
    """Within the block, the selection takes a label map's histogram from ``known`` (by real path) and its size,
    and the image's size, from the tree's frame size: nothing is read."""
    counts, sizes = label_cache.label_map_counts, label_cache.image_size
    label_cache.label_map_counts = lambda path, level=3: (known[os.path.realpath(path)], (HEIGHT, WIDTH))
    label_cache.image_size = lambda path, name: (HEIGHT, WIDTH)
    try:
        yield
    finally:
        label_cache.label_map_counts, label_cache.image_size = counts, sizes


def cache_dir(output_dir: Path) -> Path:
    """The label cache folder of one benchmark run: inside its output folder, so removing the folder empties it."""
    return output_dir / "label_cache"


def prime_cache(tree: Path, output_dir: Path, known: dict[str, np.ndarray]) -> None:
    """Fill ``output_dir``'s label cache for every label map of ``tree`` from ``known`` histograms."""
    shutil.rmtree(output_dir, ignore_errors=True)
    label_set = get_label_set("idd-level3")
    pool = load_candidate_pool(DataSourceArguments(data_dir=str(tree)), label_set)
    with histograms_from(known):
        compute_class_stats(pool, label_set, cache_dir(output_dir) / CACHE_FILE, num_workers=1, progress=False)


def time_selection(data_dir: Path, output_dir: Path, workers: int, budget: int,
                   weights: tuple[float, float, float], fresh: bool, repeats: int) -> Timing:
    """``repeats`` in-process selections (``fresh`` removes the output folder and cache before each, untimed)."""
    data_args = DataSourceArguments(data_dir=str(data_dir), num_workers=workers,
                                    label_cache_dir=str(cache_dir(output_dir)))
    alpha, beta, gamma = weights
    selection_args = SelectionArguments(output_dir=str(output_dir), num_images=budget, alpha=alpha, beta=beta,
                                        gamma=gamma)

    def select() -> None:
        outputs = run_selection.run(data_args, selection_args)
        expected_decodes = outputs["num_candidates"] if fresh else 0
        if outputs["decoded"] != expected_decodes:
            raise RuntimeError(f"expected {expected_decodes} decoded label maps, got {outputs['decoded']}")

    def clear_output() -> None:
        shutil.rmtree(output_dir, ignore_errors=True)

    return time_passes(select, repeats, setup=clear_output if fresh else None)


def decode_with_pil(paths: list[Path]) -> None:
    """Decode every label PNG with PIL in this process."""
    for path in paths:
        with Image.open(path) as image:
            image.load()


def decode_with_opencv(paths: list[Path]) -> None:
    """Decode every label PNG with OpenCV in this process."""
    for path in paths:
        if cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
            raise RuntimeError(f"OpenCV cannot decode {path}")


def main() -> None:
    """Generate or reuse the maps, time (a)-(d) and print the figures, ratios and fit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_maps", type=int, default=500)
    parser.add_argument("--work_dir", default="/tmp/roadseg_bench_selection")
    parser.add_argument("--workers", type=int, default=_cores(), help="processes for (c) (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs for (a) to (d)")
    args = parser.parse_args()
    if args.num_maps < 500:
        parser.error("--num_maps must be at least 500")
    std_logging.basicConfig(level=std_logging.WARNING)
    work_dir = Path(args.work_dir)
    data = ensure_maps(work_dir, args.num_maps)
    runs = work_dir / "runs"
    budget = args.num_maps // 5
    labels = sorted(data.glob(f"gtFine/train/*/*{LABEL_SUFFIX}"))
    for path in labels:  # page cache, so every figure times decoding rather than the disk
        path.read_bytes()
    warm = symlink_tree(data, work_dir / "trees" / "n20", 20)
    time_selection(warm, runs / "warmup", 1, 5, (0.4, 0.4, 0.2), fresh=True, repeats=1)

    load_before = os.getloadavg()
    decode = time_passes(lambda: decode_with_pil(labels), args.repeats)
    decode_opencv = time_passes(lambda: decode_with_opencv(labels), args.repeats)
    serial = time_selection(data, runs / "serial", 1, budget, (0.4, 0.4, 0.2), fresh=True, repeats=args.repeats)
    parallel = time_selection(data, runs / "parallel", args.workers, budget, (0.4, 0.4, 0.2), fresh=True,
                              repeats=args.repeats)
    rerun = time_selection(data, runs / "parallel", 1, budget, (0.1, 0.7, 0.2), fresh=False, repeats=args.repeats)
    label_set = get_label_set("idd-level3")
    stats = compute_class_stats(load_candidate_pool(DataSourceArguments(data_dir=str(data)), label_set), label_set,
                                cache_dir(runs / "parallel") / CACHE_FILE, progress=False)
    known = {os.path.realpath(r.label_path): h for r, h in zip(stats.pool.records, stats.histograms, strict=True)}
    fit_times = []
    for size in FIT_SIZES:
        tree = symlink_tree(data, work_dir / "trees" / f"n{size}", size)
        prime_cache(tree, runs / f"fit{size}", known)
        fit_times.append(time_selection(tree, runs / f"fit{size}", 1, size // 5, (0.0, 1.0, 0.0), fresh=False,
                                        repeats=args.repeats).min)
    slope, intercept = np.polyfit(FIT_SIZES, fit_times, 1)
    load_after = os.getloadavg()

    tree300 = symlink_tree(data, work_dir / "trees" / "n300", 300)
    prime_cache(tree300, runs / "cli300", known)
    command = [sys.executable, "run_selection.py", "--data_dir", str(tree300), "--num_images", "60", "--output_dir",
               str(runs / "cli300"), "--alpha", "0", "--beta", "1", "--gamma", "0", "--label_cache_dir",
               str(cache_dir(runs / "cli300"))]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    cli = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import run_selection"], check=True)
    imports = time.perf_counter() - start

    n = args.num_maps
    print(f"\n{n} label maps of {HEIGHT}x{WIDTH}, K = {budget}, {_cores()} cores, best of {args.repeats}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'step':58s} {'wall (s)':>9s} {'ms/map':>7s} {'CPU (s)':>8s}")
    rows = [("(a) decode every label PNG with PIL, one process", decode),
            ("(a') decode every label PNG with OpenCV, one process", decode_opencv),
            ("(b) selection end to end, one process, no cache", serial),
            (f"(c) selection end to end, {args.workers} processes, no cache", parallel),
            ("(d) cached rerun with other weights, one process", rerun)]
    for name, timing in rows:
        print(f"{name:58s} {timing.min:9.2f} {1000 * timing.min / n:7.2f} {timing.cpu_of_fastest:8.2f}")
    print(f"b/a = {serial.min / decode.min:.2f} (target <= 1.3; CPU "
          f"{serial.cpu_of_fastest / decode.cpu_of_fastest:.2f}); b/a' = {serial.min / decode_opencv.min:.2f} (CPU "
          f"{serial.cpu_of_fastest / decode_opencv.cpu_of_fastest:.2f}); b/c = {serial.min / parallel.min:.2f} "
          f"(target >= 1.6 on 2 cores; CPU c/b {parallel.cpu_of_fastest / serial.cpu_of_fastest:.2f})")
    print("(d) on trees of " + ", ".join(f"{s}: {t:.2f} s" for s, t in zip(FIT_SIZES, fit_times, strict=True)))
    print(f"linear fit: t = {intercept:.3f} s + {1000 * slope:.4f} ms x N -> {EXTRAPOLATE_TO} images: "
          f"{intercept + slope * EXTRAPOLATE_TO:.2f} s (target <= 2 s)")
    print(f"command line, cached rerun of 300 images with other weights: {cli:.2f} s wall, of which "
          f"{imports:.2f} s is `python -c 'import run_selection'`")


if __name__ == "__main__":
    main()
