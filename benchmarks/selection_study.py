"""Does a selection train a better model than a random subset of the same size? Train on each and score them.

Takes a pool (an IDD tree's ``leftImg8bit/train``; by default the synthetic demo set is generated), a budget K and
the strategies, fine-tunes the same model with identical settings (run_finetune.py, same seed, steps and batch) on
each strategy's K images, scores each on the same labelled test split, and writes ``study.json`` (the input of
``run_selection.py --study_results``), ``study.md`` (the table) and ``study.png`` (the plot) to --output_dir.

Strategies: ``weighted`` (roadseg's score from labels), ``weighted_model`` (the same score from the maps a scout
model predicts, no labels read), ``rare_class_sampling``, ``diversity`` (k-center greedy on the scout's pooled
encoder features), ``random`` (one run per --random_seeds) and ``all`` (every pool image: the ceiling). The scout is
the model trained on random seed 0's subset: the model a user who labelled K random images first would have.

    python -m benchmarks.selection_study --output_dir runs/study            # the demo set, K=60 of 300
    python -m benchmarks.selection_study --data_dir data/idd --budget 1500 --max_steps 20000 --output_dir runs/s

With a --data_dir the tree needs a labelled ``test`` folder (the demo set gets one generated), so every strategy is
scored on the same images, none of which any strategy can pick.
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

import numpy as np

from roadseg_utils.atomic import write_text_atomically
from roadseg_utils.data import DataSourceArguments
from roadseg_utils.labels import get_label_set
from roadseg_utils.selection import compute_class_stats, load_candidate_pool, load_manifest
from roadseg_utils.synthetic import generate_synthetic_idd

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("weighted", "weighted_model", "rare_class_sampling", "diversity", "random", "all")
# The demo's fine-tuning settings (Makefile `demo`), kept identical for every subset.
FINETUNE = ["--model_name_or_path", "tiny", "--per_device_train_batch_size", "4", "--crop_size", "192x320",
            "--eval_shortest_edge", "192", "--learning_rate", "3e-3", "--eval_strategy", "no", "--save_strategy",
            "no", "--do_predict", "True", "--disable_tqdm", "True", "--seed", "42", "--train_fraction", "1.0",
            "--val_fraction", "0.0", "--test_fraction", "0.0"]


def _run(command: list[str], log: Path) -> float:
    """Run a script with its output in ``log``; its wall seconds. A failure stops the study naming the log."""
    start = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode:
        sys.exit(f"error: {command[0]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _demo_data(folder: Path, num_images: int, num_test: int) -> Path:
    """The demo's synthetic pool (train) plus labelled val and test folders no strategy can pick from."""
    if not (folder / "leftImg8bit" / "test").is_dir():
        generate_synthetic_idd(folder, num_images, 12, "360x640", seed=0, split="train")
        generate_synthetic_idd(folder, max(4, num_test // 4), 3, "360x640", seed=0, split="val")
        generate_synthetic_idd(folder, num_test, 4, "360x640", seed=0, split="test")
    return folder


def _select(data_dir: Path, out: Path, budget: int, strategy: str, seed: int, extra: list[str]) -> Path:
    """run_selection.py for one strategy; the manifest it writes."""
    _run(["run_selection.py", "--data_dir", str(data_dir), "--num_images", str(budget), "--strategy", strategy,
          "--seed", str(seed), "--output_dir", str(out), "--no_plots", *extra], out.parent / f"{out.name}.log")
    return out / "manifest.json"


def _finetune(data_dir: Path, out: Path, steps: int, manifest: Path | None) -> dict[str, Any]:
    """Fine-tune on the manifest's images (all pool images without one); test metrics and wall seconds."""
    chosen = ["--selection_manifest", str(manifest)] if manifest else []
    seconds = _run(["run_finetune.py", "--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps",
                    str(steps), *FINETUNE, *chosen], out.parent / f"{out.name}.log")
    metrics = json.loads((out / "test_results.json").read_text())
    return {"metrics": metrics, "seconds": seconds}


def _iou(run: dict[str, Any], name: str) -> float:
    """A class's test IoU (NaN where the class is absent from the test split and never predicted: JSON null)."""
    value = run["metrics"].get(f"test_iou_{name}")
    return float("nan") if value is None else float(value)


def _summarise(name: str, runs: list[dict[str, Any]], rare_names: list[str], class_images: np.ndarray,
               names: list[str]) -> dict[str, Any]:
    mious = np.array([run["metrics"]["test_mean_iou"] for run in runs])
    rare = np.array([np.nanmean([_iou(run, c) for c in rare_names]) if rare_names else np.nan for run in runs])
    per_class = {c: float(np.nanmean([_iou(run, c) for run in runs])) for c in names}
    return {"strategy": name, "runs": len(runs), "miou_mean": float(mious.mean()), "miou_std": float(mious.std()),
            "miou_runs": mious.tolist(), "rare_iou_mean": float(np.nanmean(rare)) if rare_names else float("nan"),
            "train_seconds": float(np.mean([run["seconds"] for run in runs])),
            "images_per_class": {c: float(v) for c, v in zip(names, class_images, strict=True)},
            "iou_per_class": per_class}


def _table(study: dict[str, Any]) -> str:
    lines = [f"Pool {study['pool_size']} images, K = {study['budget']}, {study['max_steps']} steps each; "
             f"rare classes: {', '.join(study['rare_classes']) or 'none'}.", "",
             "| strategy | runs | test mIoU (mean ± std) | rare-class mean IoU | training s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in study["results"]:
        lines.append(f"| {row['strategy']} | {row['runs']} | {row['miou_mean']:.4f} ± {row['miou_std']:.4f} | "
                     f"{row['rare_iou_mean']:.4f} | {row['train_seconds']:.0f} |")
    names = list(study["results"][0]["images_per_class"])
    lines += ["", "Images per class in each subset (random: mean over seeds) and test IoU per class:", "",
              "| class | " + " | ".join(r["strategy"] for r in study["results"]) + " |",
              "| --- | " + " | ".join("---:" for _ in study["results"]) + " |"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{r['images_per_class'][name]:.0f} / {r['iou_per_class'][name]:.3f}" for r in study["results"]) + " |")
    return "\n".join(lines) + "\n"


def _plot(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["results"]
    labels = [r["strategy"] for r in rows]
    x = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.bar(x - 0.2, [r["miou_mean"] for r in rows], 0.4, yerr=[r["miou_std"] for r in rows], capsize=3,
             label="test mIoU (mean ± std)")
    axis.bar(x + 0.2, [r["rare_iou_mean"] for r in rows], 0.4, label="rare-class mean IoU")
    axis.set_xticks(x, labels, rotation=20)
    axis.set_ylabel("IoU")
    axis.set_title(f"K = {study['budget']} of {study['pool_size']} images, {study['max_steps']} steps")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    """Select with every strategy, fine-tune on each subset, score each on the test split, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="IDD tree with train and labelled test (default: demo set)")
    parser.add_argument("--output_dir", default="runs/selection_study")
    parser.add_argument("--budget", type=int, default=60, help="K: images each strategy keeps")
    parser.add_argument("--num_images", type=int, default=300, help="pool size of the generated demo set")
    parser.add_argument("--num_test", type=int, default=60, help="test images of the generated demo set")
    parser.add_argument("--max_steps", type=int, default=150, help="fine-tuning steps of every run")
    parser.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else _demo_data(out / "data", args.num_images,
                                                                              args.num_test)
    label_set = get_label_set("idd-level3")
    pool_stats = compute_class_stats(load_candidate_pool(DataSourceArguments(data_dir=str(data_dir)), label_set),
                                     label_set, progress=False)
    index = {path: i for i, path in enumerate(pool_stats.pool.paths)}
    presence = pool_stats.histograms[:, :label_set.num_labels] > 0
    frequency = presence.mean(axis=0)
    names = [label_set.id2label[c] for c in range(label_set.num_labels)]
    rare_names = [names[c] for c in np.flatnonzero((frequency > 0) & (frequency < 0.1))]
    runs: dict[str, list[dict[str, Any]]] = {}
    class_images: dict[str, list[np.ndarray]] = {}

    def train(name: str, manifest: Path | None, tag: str) -> dict[str, Any]:
        if manifest is not None:
            _, rows = load_manifest(str(manifest))
            chosen = [index[row["path"]] for row in rows if row["selected"]]
        else:
            chosen = list(range(len(index)))
        class_images.setdefault(name, []).append(presence[chosen].sum(axis=0))
        result = _finetune(data_dir, out / f"train_{tag}", args.max_steps, manifest)
        runs.setdefault(name, []).append(result)
        print(f"{tag}: test mIoU {result['metrics']['test_mean_iou']:.4f} in {result['seconds']:.0f} s", flush=True)
        return result

    wanted = set(args.strategies)
    needs_scout = wanted & {"weighted_model", "diversity"}
    if "random" in wanted or needs_scout:
        for seed in args.random_seeds if "random" in wanted else args.random_seeds[:1]:
            train("random", _select(data_dir, out / f"select_random_{seed}", args.budget, "random", seed, []),
                  f"random_{seed}")
    scout = str(out / f"train_random_{args.random_seeds[0]}")
    for name in ("weighted", "rare_class_sampling"):
        if name in wanted:
            train(name, _select(data_dir, out / f"select_{name}", args.budget, name, 0, []), name)
    if "weighted_model" in wanted:
        manifest = _select(data_dir, out / "select_weighted_model", args.budget, "weighted", 0,
                           ["--label_source", "model", "--model_name_or_path", scout])
        train("weighted_model", manifest, "weighted_model")
    if "diversity" in wanted:
        manifest = _select(data_dir, out / "select_diversity", args.budget, "diversity", 0,
                           ["--model_name_or_path", scout])
        train("diversity", manifest, "diversity")
    if "all" in wanted:
        train("all", None, "all")
    results = [_summarise(name, runs[name], rare_names, np.mean(class_images[name], axis=0), names)
               for name in STRATEGIES if name in runs]
    study = {"command": " ".join(["python -m benchmarks.selection_study", *sys.argv[1:]]), "budget": args.budget,
             "pool_size": len(index), "max_steps": args.max_steps, "rare_classes": rare_names,
             "data_dir": str(data_dir), "wall_seconds": time.perf_counter() - start, "results": results}
    write_text_atomically(out / "study.json", json.dumps(study, indent=2) + "\n")
    write_text_atomically(out / "study.md", _table(study))
    _plot(study, out / "study.png")
    print(_table(study))
    print(f"wrote {out / 'study.json'}, study.md and study.png in {study['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
