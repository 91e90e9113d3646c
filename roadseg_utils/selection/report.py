"""report.md (counts, class frequencies, the strategy comparison, images per sequence) and the selection plots."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..labels import LabelSet
from .strategies import Selection

REPORT_FILE = "report.md"
PLOT_FILES = ("class_frequency.png", "score_distribution.png")


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value ("2" before "10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _share(part: int | float, whole: int | float) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def strategy_comparison(selection: Selection) -> dict[str, dict[str, np.ndarray | float]]:
    """Per strategy: the share of its K images containing each class, mean CDS, classes and sequences covered."""
    comparison: dict[str, dict[str, Any]] = {}
    sequences = np.asarray(selection.sequences, dtype=object)
    for name, subset in selection.subsets.items():
        chosen = selection.presence[subset]
        comparison[name] = {
            "class_share": chosen.mean(axis=0) if len(subset) else np.zeros(chosen.shape[1]),
            "mean_cds": float(selection.cds[subset].mean()) if len(subset) else 0.0,
            "classes_covered": int(chosen.any(axis=0).sum()),
            "sequences_covered": len(set(sequences[subset])),
        }
    return comparison


def _label_source_lines(selection: Selection) -> list[str]:
    header = selection.header
    model = header.get("model")
    lines = []
    if header.get("label_source") == "model":
        lines.append(f"Class histograms come from the maps model `{model['name']}` (fingerprint "
                     f"`{model['fingerprint']}`) predicts at the reduced size, not from labels.")
    elif model:
        lines.append(f"Class histograms come from the labels; model `{model['name']}` (fingerprint "
                     f"`{model['fingerprint']}`) gave the uncertainty and embeddings.")
    if header.get("delta", 0) > 0 and selection.uncertainty is not None:
        lines.append(f"Uncertainty (mean per-pixel entropy, nats) weighs delta = {header['delta']}: pool mean "
                     f"{selection.uncertainty.mean():.3f}, selected mean "
                     f"{selection.uncertainty[selection.selected].mean():.3f}.")
    return lines + [""] if lines else []


def study_section(study: dict[str, Any], strategy: str) -> list[str]:
    """Where ``strategy`` stands among the strategies a study (benchmarks/selection_study.py) trained and scored."""
    rows = study["results"]
    lines = ["", "## What the selection buys", "",
             f"From `{study.get('command', 'benchmarks/selection_study.py')}`: the same model fine-tuned with "
             f"identical settings on each strategy's K = {study['budget']} images of a {study['pool_size']}-image "
             "pool, scored on the same test split (mIoU mean ± std over seeds where a strategy draws with a seed).",
             "", "| strategy | runs | test mIoU | rare-class mean IoU | training s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    ordered = sorted(rows, key=lambda row: -row["miou_mean"])
    for row in ordered:
        mark = " (this run's strategy)" if row["strategy"] == strategy else ""
        lines.append(f"| {row['strategy']}{mark} | {row['runs']} | {row['miou_mean']:.4f} ± {row['miou_std']:.4f} | "
                     f"{row['rare_iou_mean']:.4f} | {row['train_seconds']:.0f} |")
    names = [row["strategy"] for row in ordered]
    if strategy in names:
        position = names.index(strategy) + 1
        random = next((row for row in rows if row["strategy"] == "random"), None)
        own = ordered[position - 1]
        verdict = f"**{strategy}** ranks {position} of {len(names)} by test mIoU"
        if random is not None and strategy != "random":
            gap = own["miou_mean"] - random["miou_mean"]
            beats = "above" if gap > random["miou_std"] else "below" if gap < -random["miou_std"] else "within"
            verdict += f"; {gap:+.4f} against random, {beats} random's seed-to-seed spread ({random['miou_std']:.4f})"
        lines += ["", verdict + "."]
    else:
        lines += ["", f"The study did not measure strategy {strategy}."]
    return lines


def render_report(selection: Selection, label_set: LabelSet, plots: Sequence[str] = (),
                  study: dict[str, Any] | None = None) -> str:
    """report.md: counts, class image frequency before and after, the strategy comparison, images per sequence, and
    with a ``study`` where this selection's strategy stands among those the study measured."""
    header = selection.header
    strategies = list(selection.subsets)
    budget, total = header["num_images"], header["num_candidates"]
    chosen = np.flatnonzero(selection.selected)
    pool_counts = selection.presence.sum(axis=0)
    subset_counts = selection.presence[chosen].sum(axis=0)
    rare = set(selection.rare_ids)
    names = label_set.id2label
    lines = [
        "# Image selection report",
        "",
        f"Ranked the {total} images of the training pool of `{header['dataset']['source']}` "
        f"(fingerprint `{header['dataset']['fingerprint']}`) and selected {budget} with strategy "
        f"**{header['strategy']}** (seed {header['seed']}). Validation and test images are not ranked.",
        "",
        *_label_source_lines(selection),
        f"`{header['formula']}` with alpha = {header['alpha']}, beta = {header['beta']}, gamma = {header['gamma']}"
        + (f", delta = {header['delta']}:" if header.get("delta", 0) > 0 else ":"),
        "",
        f"- CDS ({header['cds_mode']}): " + (
            f"classes with at least {header['min_pixels']} pixel(s) in the image" if header["cds_mode"] == "count"
            else "Shannon entropy (nats) of the image's class pixel shares"),
        f"- RCS ({header['rcs_mode']}): " + (
            "sum over present classes of -ln(share of pool images containing the class)"
            if header["rcs_mode"] == "neglog" else "number of present classes from the rare set"),
        f"- ICS ({header['ics_mode']}): " + (
            "images in the image's sequence folder" if header["ics_mode"] == "count"
            else "1 / images in the image's sequence folder"),
        f"- Rare set ({header['rare_set']}): " + (
            ", ".join(f"{names[c]} ({selection.frequency[c]:.1%})" for c in selection.rare_ids) or "none"),
        "",
        "## Counts",
        "",
        "| | training pool | selected |",
        "| --- | ---: | ---: |",
        f"| images | {total} | {budget} |",
        f"| sequences | {len(set(selection.sequences))} | {len({selection.sequences[i] for i in chosen})} |",
        f"| classes in at least one image | {int((pool_counts > 0).sum())} | {int((subset_counts > 0).sum())} |",
        f"| mean CDS | {selection.cds.mean():.3f} | {selection.cds[chosen].mean():.3f} |",
        f"| mean RCS | {selection.rcs.mean():.3f} | {selection.rcs[chosen].mean():.3f} |",
        f"| score range | {selection.score.min():.4f} - {selection.score.max():.4f} | "
        f"{selection.score[chosen].min():.4f} - {selection.score[chosen].max():.4f} |",
        f"| images skipped as bad | {len(header['skipped'])} | |",
        "",
        "## Image frequency of each class",
        "",
        "Share of images that contain the class, before (training pool) and after (selected subset) selection.",
        "",
        "| id | class | rare | pool images | pool share | selected images | selected share |",
        "| ---: | --- | :---: | ---: | ---: | ---: | ---: |",
    ]
    for c in range(label_set.num_labels):
        lines.append(
            f"| {c} | {names[c]} | {'yes' if c in rare else ''} | {int(pool_counts[c])} | "
            f"{_share(pool_counts[c], total)} | {int(subset_counts[c])} | {_share(subset_counts[c], budget)} |"
        )
    comparison = strategy_comparison(selection)
    lines += [
        "",
        f"## Strategies compared at K = {budget}",
        "",
        "Share of each strategy's images containing each rare class (random: one seeded draw; its expectation is the "
        "pool share).",
        "",
        "| class | pool | " + " | ".join(strategies) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in strategies) + " |",
    ]
    for c in selection.rare_ids:
        lines.append(f"| {names[c]} | {selection.frequency[c]:.1%} | "
                     + " | ".join(f"{comparison[s]['class_share'][c]:.1%}" for s in strategies) + " |")
    lines.append("| mean CDS | " + f"{selection.cds.mean():.2f} | "
                 + " | ".join(f"{comparison[s]['mean_cds']:.2f}" for s in strategies) + " |")
    lines.append(f"| classes covered | {int((pool_counts > 0).sum())} | "
                 + " | ".join(str(comparison[s]["classes_covered"]) for s in strategies) + " |")
    lines.append(f"| sequences covered | {len(set(selection.sequences))} | "
                 + " | ".join(str(comparison[s]["sequences_covered"]) for s in strategies) + " |")
    if selection.rare_ids:
        weighted = comparison["weighted"]["class_share"]
        random = comparison["random"]["class_share"]
        wins = [c for c in selection.rare_ids if weighted[c] > random[c]]
        lines += ["", f"weighted holds a larger share than random for {len(wins)} of {len(selection.rare_ids)} "
                      "rare classes" + ("." if len(wins) == len(selection.rare_ids) else ": not for "
                                        + ", ".join(names[c] for c in selection.rare_ids if c not in wins) + ".")]
    per_sequence: dict[str, list[int]] = {}
    for sequence, is_selected in zip(selection.sequences, selection.selected, strict=True):
        counts = per_sequence.setdefault(sequence, [0, 0])
        counts[0] += 1
        counts[1] += int(is_selected)
    lines += ["", "## Images per sequence", "", "| sequence | pool | selected | share selected |",
              "| --- | ---: | ---: | ---: |"]
    for sequence in sorted(per_sequence, key=_natural_key):
        in_pool, in_subset = per_sequence[sequence]
        lines.append(f"| {sequence} | {in_pool} | {in_subset} | {_share(in_subset, in_pool)} |")
    if study is not None:
        # The study names the weighted score from predictions apart from the one from labels.
        from_model = header["strategy"] == "weighted" and header.get("label_source") == "model"
        lines += study_section(study, "weighted_model" if from_model else header["strategy"])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(selection: Selection, label_set: LabelSet, output_dir: str | os.PathLike[str]) -> list[Path]:
    """class_frequency.png and score_distribution.png in ``output_dir`` (report.md holds the strategy table)."""
    from ..visualize import plot_class_frequency, plot_score_distribution

    output_dir = Path(output_dir)
    names = [label_set.id2label[c] for c in range(label_set.num_labels)]
    subset_share = selection.presence[selection.selected].mean(axis=0)
    cutoff = float(selection.score[selection.selected].min()) if selection.header["strategy"] == "weighted" else None
    return [
        plot_class_frequency(names, selection.frequency, subset_share, selection.rare_ids,
                             output_dir / PLOT_FILES[0]),
        plot_score_distribution(selection.score, selection.selected, output_dir / PLOT_FILES[1], cutoff),
    ]
