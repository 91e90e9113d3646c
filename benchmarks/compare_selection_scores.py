"""Compare selection scores by how often each favours the rare classes less than a random subset does.

For several synthetic sets and budgets K, counts the (rare class, set, K) cases in which the weighted subset
holds a smaller or equal share of images with that rare class than a seeded random subset of the same size,
for the seed project's score (count / neglog / count) and for roadseg's defaults (entropy / count / inverse).

    python -m benchmarks.compare_selection_scores [--seeds 0 1 2 3] [--budgets 30 50 100 150]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from roadseg_utils.data import DataSourceArguments
from roadseg_utils.labels import get_label_set
from roadseg_utils.selection import SelectionArguments, compute_class_stats, load_candidate_pool, select_images
from roadseg_utils.synthetic import generate_synthetic_idd

SCORES = {
    "seed (count/neglog/count)": ("count", "neglog", "count"),
    "roadseg default (entropy/count/inverse)": ("entropy", "count", "inverse"),
    "count/count/inverse": ("count", "count", "inverse"),
}


def main() -> None:
    """Generate the sets, score them every way, and print one line per score."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 50, 100, 150])
    parser.add_argument("--num_images", type=int, default=300)
    parser.add_argument("--image_size", default="90x160")
    parser.add_argument("--work_dir", default=None, help="where the synthetic sets go (default: a temporary folder)")
    args = parser.parse_args()
    label_set = get_label_set("idd-level3")
    failures = dict.fromkeys(SCORES, 0)
    sequences_covered = {name: [] for name in SCORES}
    cases = 0
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work_dir or scratch)
        for seed in args.seeds:
            data_dir = root / f"syn_seed{seed}"
            if not data_dir.exists():
                generate_synthetic_idd(data_dir, args.num_images, 12, args.image_size, seed=seed)
            data_args = DataSourceArguments(data_dir=str(data_dir))
            stats = compute_class_stats(load_candidate_pool(data_args, label_set), label_set, progress=False)
            for budget in args.budgets:
                for name, (cds, rcs, ics) in SCORES.items():
                    selection_args = SelectionArguments(
                        output_dir=str(root), num_images=budget, cds_mode=cds, rcs_mode=rcs, ics_mode=ics, seed=seed
                    )
                    selection = select_images(stats, selection_args, label_set)
                    weighted = selection.presence[selection.subsets["weighted"]].mean(axis=0)
                    random = selection.presence[selection.subsets["random"]].mean(axis=0)
                    failures[name] += int(sum(weighted[c] <= random[c] for c in selection.rare_ids))
                    sequences_covered[name].append(
                        len({selection.sequences[i] for i in selection.subsets["weighted"]})
                    )
                cases += len(selection.rare_ids)
    print(f"{len(args.seeds)} synthetic sets x budgets {args.budgets}: {cases} (rare class, set, K) cases")
    print(f"{'score (cds/rcs/ics)':<42} {'not above random':>17} {'mean sequences covered (of 12)':>31}")
    for name in SCORES:
        mean_sequences = sum(sequences_covered[name]) / len(sequences_covered[name])
        print(f"{name:<42} {failures[name]:>17} {mean_sequences:>31.1f}")


if __name__ == "__main__":
    main()
