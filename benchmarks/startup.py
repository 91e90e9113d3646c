"""Start-up of run_finetune.py at IDD scale: launch to first training step, and label maps decoded, side by side.

Run from the repository root: ``python -m benchmarks.startup [--large 8000 --small 100 --work_dir DIR]``.

On trees of ``--small`` and ``--large`` 1080x1920 frames (symlinks to 20 generated frames, as in bench_selection.py;
train only, so validation and test are carved from the pool selection ranks), each start is its own process,
timed from just before it is launched to the first training step (``on_step_begin``), where it exits:

- cold: no label cache, so every image header is read and every label map decoded (the start-up before the cache);
- run_selection.py on the tree (fills the tree's label cache), then the first run_finetune.py start after it;
- a second start of run_finetune.py on the unchanged tree;
- two processes under ``accelerate launch`` (gloo on the CPU) on the small tree with an empty cache, counting the
  decodes of both ranks against one process's.

Decodes are counted by wrapping `label_cache.label_map_counts` in each process; the wrapper appends a line per map
to one file opened for appending, so forked validation workers and both ranks are counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 1080, 1920
REAL_FRAMES = 20
FINETUNE_ARGS = ["--model_name_or_path", "tiny", "--crop_size", "512x1024", "--per_device_train_batch_size", "2",
                 "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--do_eval", "False",
                 "--do_predict", "False", "--report_to", "none", "--disable_tqdm", "True"]
DECODE_LOG_ENV = "ROADSEG_BENCH_DECODE_LOG"
LAUNCH_TIME_ENV = "ROADSEG_BENCH_LAUNCHED_AT"
FIRST_STEP_ENV = "ROADSEG_BENCH_FIRST_STEP_FILE"


def count_decodes() -> None:
    """In this process and its forks: append one line per label map decoded to $ROADSEG_BENCH_DECODE_LOG."""
    from roadseg_utils.data import label_cache

    real = label_cache.label_map_counts

    def counting(path, level=3):
        with open(os.environ[DECODE_LOG_ENV], "a") as log:
            log.write(f"{os.environ.get('RANK', '0')} {os.fspath(path)}\n")
        return real(path, level)

    label_cache.label_map_counts = counting


def child(script: str, argv: list[str]) -> None:
    """Run ``script``'s main with decodes counted; fine-tuning exits at its first step when asked to time it."""
    count_decodes()
    if script == "run_selection":
        import run_selection
        run_selection.main(argv)
        return
    from transformers import TrainerCallback

    import run_finetune

    class FirstStep(TrainerCallback):
        """Write the seconds since launch at the first training step, then end the process at once."""

        def on_step_begin(self, args, state, control, **kwargs):
            if FIRST_STEP_ENV in os.environ:
                elapsed = time.time() - float(os.environ[LAUNCH_TIME_ENV])
                Path(os.environ[FIRST_STEP_ENV]).write_text(json.dumps(elapsed))
                os._exit(0)

    run_finetune.main(argv, callbacks=[FirstStep()])


def _run(command: list[str], decode_log: Path, first_step: Path | None = None) -> tuple[float | None, int]:
    """Run a child command; (seconds from launch to its first training step or None, label maps decoded)."""
    decode_log.unlink(missing_ok=True)
    decode_log.touch()
    env = {**os.environ, DECODE_LOG_ENV: str(decode_log), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           LAUNCH_TIME_ENV: repr(time.time())}
    if first_step is not None:
        first_step.unlink(missing_ok=True)
        env[FIRST_STEP_ENV] = str(first_step)
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{completed.stdout[-2000:]}{completed.stderr[-4000:]}")
    elapsed = json.loads(first_step.read_text()) if first_step is not None else None
    return elapsed, len(decode_log.read_text().splitlines())


def _child_command(script: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.startup", "--child", script, "--", *argv]


def finetune_start(tree: Path, work: Path, name: str, *extra: str) -> tuple[float, int]:
    """One timed start of run_finetune.py on ``tree`` into a fresh output folder."""
    output = work / "runs" / name
    shutil.rmtree(output, ignore_errors=True)
    argv = ["--data_dir", str(tree), "--output_dir", str(output), *FINETUNE_ARGS, *extra]
    elapsed, decodes = _run(_child_command("run_finetune", argv), work / "decodes.log", work / "first_step.json")
    return elapsed, decodes


def measure_tree(tree: Path, work: Path, size: int) -> dict[str, tuple[float | None, int]]:
    """Cold start, selection, first start after it and a second start on one tree."""
    shutil.rmtree(tree / ".roadseg_cache", ignore_errors=True)
    empty_cache = work / "runs" / f"cold{size}_cache"
    shutil.rmtree(empty_cache, ignore_errors=True)
    figures = {"cold": finetune_start(tree, work, f"cold{size}", "--label_cache_dir", str(empty_cache))}
    selection = ["--data_dir", str(tree), "--num_images", str(max(1, size // 5)), "--output_dir",
                 str(work / "runs" / f"sel{size}"), "--no_plots"]
    shutil.rmtree(work / "runs" / f"sel{size}", ignore_errors=True)
    figures["selection"] = _run(_child_command("run_selection", selection), work / "decodes.log")
    figures["after_selection"] = finetune_start(tree, work, f"after{size}")
    figures["second"] = finetune_start(tree, work, f"second{size}")
    return figures


def two_processes(tree: Path, work: Path) -> int:
    """Label maps decoded by both ranks of a two-process start with an empty label cache."""
    cache = work / "runs" / "ddp_cache"
    output = work / "runs" / "ddp"
    for folder in (cache, output):
        shutil.rmtree(folder, ignore_errors=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    argv = ["--data_dir", str(tree), "--output_dir", str(output), "--label_cache_dir", str(cache), *FINETUNE_ARGS,
            "--dataloader_num_workers", "0"]
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m",
               "benchmarks.startup", "--child", "run_finetune", "--", *argv]
    os.environ["ACCELERATE_USE_CPU"] = "1"
    _, decodes = _run(command, work / "decodes.log")
    return decodes


def build_trees(work: Path, sizes: list[int]) -> dict[int, Path]:
    """The generated frames and a symlinked tree per size."""
    from benchmarks.bench_selection import symlink_tree
    from roadseg_utils.synthetic import generate_synthetic_idd

    real = work / "frames"
    if len(list(real.glob("gtFine/train/*/*.png"))) != REAL_FRAMES:
        shutil.rmtree(real, ignore_errors=True)
        generate_synthetic_idd(real, REAL_FRAMES, 4, (HEIGHT, WIDTH), seed=0)
    return {size: symlink_tree(real, work / "trees" / f"n{size}", size) for size in sizes}


def main() -> None:
    """Build the trees, measure every start and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=8000)
    parser.add_argument("--work_dir", default="/tmp/roadseg_bench_startup")
    parser.add_argument("--child", choices=["run_selection", "run_finetune"], help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.argv)
        return
    work = Path(args.work_dir)
    trees = build_trees(work, [args.small, args.large])
    load_before = os.getloadavg()
    figures = {size: measure_tree(tree, work, size) for size, tree in trees.items()}
    ddp_decodes = two_processes(trees[args.small], work)
    load_after = os.getloadavg()

    cores = len(os.sched_getaffinity(0))
    print(f"\nrun_finetune.py start-up on trees of {HEIGHT}x{WIDTH} frames (tiny model, batch 2 of 512x1024 crops), "
          f"{cores} cores; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'start':52s}" + "".join(f"{f'{size} maps: s':>16s}{'decoded':>9s}" for size in trees))
    names = {"cold": "cold start, no label cache (the old start-up)", "selection": "run_selection.py (fills the cache)",
             "after_selection": "first start after run_selection.py", "second": "second start, unchanged tree"}
    for key, name in names.items():
        cells = ""
        for size in trees:
            elapsed, decodes = figures[size][key]
            cells += f"{'-' if elapsed is None else f'{elapsed:.2f}':>16s}{decodes:>9d}"
        print(f"{name:52s}{cells}")
    small, large = figures[args.small], figures[args.large]
    print(f"(a) second start, {args.large} vs {args.small} maps: {large['second'][0] / small['second'][0]:.2f}x "
          f"(target <= 1.5x); cold start {args.large} maps: {large['cold'][0] / large['second'][0]:.1f}x the "
          "second start")
    print(f"(b) first start after run_selection.py: {small['after_selection'][1]} and {large['after_selection'][1]} "
          "label maps decoded (target 0)")
    print(f"(c) two processes under accelerate launch, {args.small} maps, empty cache: {ddp_decodes} decodes in all; "
          f"one process: {small['cold'][1]} (target: equal)")


if __name__ == "__main__":
    main()
