"""What each plotting stack costs: importing matplotlib, the selection plots with PIL or matplotlib, the eval charts.

Run from the repository root: ``python -m benchmarks.bench_plots [--processes 3 --repeats 5]``.

Every line is measured in fresh Python processes started by this run (the median over ``--processes`` of them), with
numpy, PIL and `roadseg_utils.visualize` already imported, as in every roadseg script that draws, so the import and
first-draw costs are those a script pays once per run:

(a) importing ``matplotlib.pyplot``, and ``matplotlib.figure`` (all the charts use);
(b) the two selection plots (class frequency of the 26 IDD level-3 classes, score histogram of ``--num_scores``
    images) drawn and saved by `roadseg_utils.visualize` with PIL, and the same two drawn with matplotlib's
    ``Figure``, as run_selection.py would draw them on one stack;
(c) the two evaluation charts (`visualize.save_score_charts`, confusion matrix and per-class IoU) with matplotlib.

"first draw" is the first call after the imports, "warm draw" the median of ``--repeats`` calls after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MEASUREMENTS = {
    "import_pyplot": "(a) import matplotlib.pyplot",
    "import_figure": "(a) import matplotlib.figure",
    "selection_pil": "(b) selection plots with PIL",
    "selection_matplotlib": "(b) selection plots with matplotlib",
    "eval_matplotlib": "(c) evaluation charts with matplotlib",
}
RARE_CLASSES = (7, 11, 15, 16, 19, 23)
SELECTED_SHARE = 0.2


def plot_inputs(num_scores: int, seed: int = 0) -> dict[str, Any]:
    """Class shares, scores, a confusion matrix and its IoUs, shaped like a run on the IDD level-3 classes."""
    import numpy as np

    from roadseg_utils.labels import idd_label_set

    rng = np.random.default_rng(seed)
    label_set = idd_label_set(3)
    num_labels = label_set.num_labels
    scores = rng.gamma(2.0, 0.1, size=num_scores)
    cutoff = float(np.quantile(scores, 1 - SELECTED_SHARE))
    confusion = rng.integers(0, 2000, size=(num_labels, num_labels)) + np.diag(rng.integers(10**5, 10**6, num_labels))
    hits = np.diag(confusion)
    iou = hits / (confusion.sum(axis=0) + confusion.sum(axis=1) - hits)
    return {
        "label_set": label_set,
        "class_names": [label_set.id2label[index] for index in range(num_labels)],
        "pool_share": rng.random(num_labels),
        "subset_share": rng.random(num_labels),
        "scores": scores,
        "selected": scores >= cutoff,
        "cutoff": cutoff,
        "confusion": confusion,
        "metrics": {"per_category_iou": iou, "mean_iou": float(iou.mean())},
    }


def class_frequency_with_matplotlib(inputs: dict[str, Any], path: Path) -> None:
    """The class-frequency plot of `visualize.plot_class_frequency`, drawn with matplotlib."""
    import numpy as np
    from matplotlib.figure import Figure

    from roadseg_utils import visualize

    names = [f"{index} {name}" for index, name in enumerate(inputs["class_names"])]
    figure = Figure(figsize=(8.0, 1.2 + 0.24 * len(names)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(names))[::-1]
    pool_color, selected_color = (np.array(c) / 255 for c in (visualize.POOL_COLOR, visualize.SELECTED_COLOR))
    axes.barh(positions + 0.2, 100 * inputs["pool_share"], height=0.4, color=pool_color, label="training pool")
    axes.barh(positions - 0.2, 100 * inputs["subset_share"], height=0.4, color=selected_color, label="selected")
    axes.set_yticks(positions, labels=names, fontsize=8)
    for index, tick in enumerate(axes.get_yticklabels()):
        if index in RARE_CLASSES:
            tick.set_color(np.array(visualize.RARE_COLOR) / 255)
    axes.set_xlim(0, 100)
    axes.set_xlabel("images containing the class (%)")
    axes.set_title("Class image frequency before and after selection (rare classes in red)")
    axes.legend(loc="lower right", fontsize=8)
    figure.savefig(path, format="png")


def score_distribution_with_matplotlib(inputs: dict[str, Any], path: Path) -> None:
    """The score histogram of `visualize.plot_score_distribution`, drawn with matplotlib."""
    import numpy as np
    from matplotlib.figure import Figure

    from roadseg_utils import visualize

    scores, selected = inputs["scores"], inputs["selected"]
    figure = Figure(figsize=(8.0, 4.0), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    colors = [np.array(c) / 255 for c in (visualize.POOL_COLOR, visualize.SELECTED_COLOR)]
    labels = [f"not selected ({int((~selected).sum())})", f"selected ({int(selected.sum())})"]
    axes.hist([scores[~selected], scores[selected]], bins=40, stacked=True, color=colors, label=labels)
    axes.axvline(inputs["cutoff"], color=np.array(visualize.RARE_COLOR) / 255, linestyle="--",
                 label=f"top-K cut-off {inputs['cutoff']:.3f}")
    axes.set_xlabel("weighted score")
    axes.set_ylabel("images")
    axes.set_title("Score distribution of the training pool")
    axes.legend(fontsize=8)
    figure.savefig(path, format="png")


def measure(name: str, num_scores: int, repeats: int) -> dict[str, float | None]:
    """Import and draw times of one measurement (see ``MEASUREMENTS``), in this process."""
    from benchmarks.timing import time_passes

    # Importing visualize (numpy, PIL) is paid on either stack; only matplotlib's own import is timed.
    from roadseg_utils import visualize

    import_s = None
    if name != "selection_pil":
        start = time.perf_counter()
        if name == "import_pyplot":
            import matplotlib.pyplot  # noqa: F401
        else:
            from matplotlib.figure import Figure  # noqa: F401
        import_s = time.perf_counter() - start
    if name.startswith("import_"):
        return {"import_s": import_s, "first_draw_s": None, "warm_draw_s": None}

    inputs = plot_inputs(num_scores)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)

        def draw() -> None:
            if name == "selection_pil":
                visualize.plot_class_frequency(inputs["class_names"], inputs["pool_share"], inputs["subset_share"],
                                               RARE_CLASSES, out / "class_frequency.png")
                visualize.plot_score_distribution(inputs["scores"], inputs["selected"], out / "score_distribution.png",
                                                  cutoff=inputs["cutoff"])
            elif name == "selection_matplotlib":
                class_frequency_with_matplotlib(inputs, out / "class_frequency.png")
                score_distribution_with_matplotlib(inputs, out / "score_distribution.png")
            else:
                visualize.save_score_charts(inputs["confusion"], inputs["metrics"], inputs["label_set"], "bench_plots",
                                            out / "confusion_matrix.png", out / "per_class_iou.png")

        timing = time_passes(draw, repeats, warmup=draw)
    return {"import_s": import_s, "first_draw_s": timing.warmup_s, "warm_draw_s": timing.median}


def measure_in_fresh_processes(name: str, processes: int, num_scores: int, repeats: int) -> dict[str, float | None]:
    """The median of each figure of :func:`measure` over ``processes`` fresh Python processes."""
    command = [sys.executable, "-m", "benchmarks.bench_plots", "--measure", name, "--num_scores", str(num_scores),
               "--repeats", str(repeats)]
    runs = []
    for _ in range(processes):
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            raise RuntimeError(f"measuring {name} in a fresh process failed:\n{done.stderr}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {key: None if runs[0][key] is None else statistics.median(run[key] for run in runs) for key in runs[0]}


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.0f}"


def main() -> None:
    """Run every measurement in fresh processes and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per line; the median is printed")
    parser.add_argument("--repeats", type=int, default=5, help="warm draws per process; the median is kept")
    parser.add_argument("--num_scores", type=int, default=500, help="images in the score histogram")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.num_scores, args.repeats)))
        return
    results = {name: measure_in_fresh_processes(name, args.processes, args.num_scores, args.repeats)
               for name in MEASUREMENTS}
    print(f"median of {args.processes} fresh processes each (visualize already imported); warm draw: median of "
          f"{args.repeats} draws; {args.num_scores} scores, 26 classes")
    print(f"{'step':<42}{'import (ms)':>13}{'first draw (ms)':>17}{'warm draw (ms)':>16}")
    for name, label in MEASUREMENTS.items():
        figures = results[name]
        print(f"{label:<42}{_ms(figures['import_s']):>13}{_ms(figures['first_draw_s']):>17}"
              f"{_ms(figures['warm_draw_s']):>16}")
    pil, mpl = results["selection_pil"], results["selection_matplotlib"]
    mpl_once = mpl["import_s"] + mpl["first_draw_s"]
    print(f"selection plots once per run: PIL {_ms(pil['first_draw_s'])} ms, matplotlib {_ms(mpl_once)} ms "
          f"(import + first draw): {mpl_once - pil['first_draw_s']:+.2f} s per selection run on matplotlib")


if __name__ == "__main__":
    main()
