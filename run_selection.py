#!/usr/bin/env python
"""Rank the training pool of a labelled dataset and keep the most informative images, with a report.

Selection ranks the images of the train split as found on disk (an IDD tree's leftImg8bit/train, every image of
flat image/mask folders, a Hugging Face dataset's train split); validation and test are never ranked. It writes
manifest.json and manifest.csv (one row per pool image: path, sequence, cds, rcs, ics, score, rank, selected),
report.md and PNG plots to --output_dir, and can materialise the subset. `run_finetune.py --selection_manifest
<output_dir>/manifest.json` then trains on the selected rows of its train split.

    python run_selection.py --data_dir data/idd --num_images 1500 --output_dir runs/selection
    python run_selection.py args.json            # the same arguments as one JSON file

Per-image label histograms are cached in the output folder, so a rerun with other weights or another budget decodes
no label map. The split options of the data source (--train_fraction, --val_fraction, --test_fraction, --split_by)
do not apply here; --num_workers sets the processes that decode label maps.
"""

from __future__ import annotations

import logging as std_logging
import sys
import time
from pathlib import Path

from transformers import HfArgumentParser
from transformers.utils import logging

from roadseg_utils.atomic import write_text_atomically
from roadseg_utils.data import DataSourceArguments
from roadseg_utils.labels import get_label_set
from roadseg_utils.selection import (
    CACHE_FILE,
    FORMULA,
    REPORT_FILE,
    SelectionArguments,
    compute_class_stats,
    load_candidate_pool,
    materialize_dataset,
    materialize_files,
    push_subset_to_hub,
    render_report,
    select_images,
    write_manifest,
    write_plots,
)

logger = logging.get_logger("run_selection")

DESCRIPTION = (
    "Rank the training pool of a labelled dataset and keep the K most informative images. The pool is the train "
    "split as found: an IDD tree's leftImg8bit/train, every image of flat image/mask folders, or the train split of "
    "a Hugging Face dataset or pickle; validation and test images are never ranked. Each image gets CDS (class "
    "diversity), RCS (rare classes) and ICS (sequence size) from its label histogram, and "
    f"{FORMULA}. Writes manifest.json/.csv, report.md and plots to --output_dir; label histograms are cached there, "
    "so reruns with other weights decode nothing."
)


def run(data_args: DataSourceArguments, selection_args: SelectionArguments) -> dict[str, object]:
    """Rank, select and write every output; returns the paths written and a few counts."""
    start = time.perf_counter()
    label_set = get_label_set(data_args.label_set)
    pool = load_candidate_pool(data_args, label_set, selection_args.seed)
    output_dir = Path(selection_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(selection_args.cache_dir or output_dir) / CACHE_FILE
    stats = compute_class_stats(pool, label_set, cache_path, data_args.num_workers, data_args.on_bad_sample)
    selection = select_images(stats, selection_args, label_set)
    json_path, csv_path = write_manifest(selection, output_dir)
    plots = write_plots(selection, label_set, output_dir) if selection_args.plots else []
    report_path = output_dir / REPORT_FILE
    write_text_atomically(report_path, render_report(selection, label_set, [p.name for p in plots]))
    chosen = [i for i, is_selected in enumerate(selection.selected) if is_selected]
    logger.info(
        f"ranked {len(stats.pool)} images ({stats.decoded} label maps decoded, {len(stats.pool) - stats.decoded} "
        f"from the cache), selected {len(chosen)} by {selection_args.strategy} in {time.perf_counter() - start:.2f} s"
    )
    outputs: dict[str, object] = {"manifest": json_path, "manifest_csv": csv_path, "report": report_path,
                                  "plots": plots, "num_candidates": len(stats.pool), "num_selected": len(chosen),
                                  "decoded": stats.decoded}
    if selection_args.materialize != "none":
        target = Path(selection_args.materialize_dir or output_dir / "subset")
        if selection_args.materialize == "hf_dataset":
            materialize_dataset(stats.pool, chosen, label_set, target)
            load_hint = f"--dataset_name {target}"
        elif stats.pool.records is None:
            raise ValueError(
                f"--materialize {selection_args.materialize} mirrors files, but {data_args.describe_source()} is a "
                "Hugging Face dataset or pickle; use --materialize hf_dataset"
            )
        else:
            materialize_files([stats.pool.records[i] for i in chosen], target, selection_args.materialize)
            load_hint = f"--data_dir {target}" + (" (with the same --image_dir/--mask_dir)"
                                                   if data_args.source_kind() == "flat" else "")
        logger.info(f"wrote the {len(chosen)} selected images to {target}; load them with {load_hint}")
        outputs["subset"] = target
        if selection_args.push_to_hub:
            url = push_subset_to_hub(target, selection_args.hub_dataset_id, selection_args.hub_private)
            logger.info(f"pushed the subset to {url}")
            outputs["hub_url"] = url
    return outputs


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse arguments (command line or one JSON file), run the selection and print where the outputs are."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((DataSourceArguments, SelectionArguments), description=DESCRIPTION)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            data_args, selection_args = parser.parse_json_file(json_file=argv[0])
        else:
            data_args, selection_args = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                            level=std_logging.INFO, stream=sys.stderr)
    logging.set_verbosity_warning()
    try:
        outputs = run(data_args, selection_args)
    except (ValueError, OSError) as err:
        # DataError and SelectionError are ValueErrors whose message names the file or option: one line, no traceback.
        sys.exit(f"error: {err}")
    print(f"selected {outputs['num_selected']} of {outputs['num_candidates']} images: {outputs['manifest']}, "
          f"{outputs['report']}")
    return outputs


if __name__ == "__main__":
    main()
