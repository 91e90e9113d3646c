#!/usr/bin/env python
"""Rank the training pool of a labelled dataset and keep the most informative images, with a report.

Selection ranks the images of the train split as found on disk (an IDD tree's leftImg8bit/train, every image of
flat image/mask folders, a Hugging Face dataset's train split); validation and test are never ranked. It writes
manifest.json and manifest.csv (one row per pool image: path, sequence, cds, rcs, ics, score, rank, selected),
report.md and PNG plots to --output_dir, and can materialise the subset. `run_finetune.py --selection_manifest
<output_dir>/manifest.json` then trains on the selected rows of its train split.

    python run_selection.py --data_dir data/idd --num_images 1500 --output_dir runs/selection
    python run_selection.py args.json            # the same arguments as one JSON file

Every sample is checked before it is ranked (the image's header, the mask decoded, their sizes, the label values):
a bad one stops the run in one line, or with --on_bad_sample skip is left out and counted in the report. Arguments
and folders are checked before any of that; the output folder is locked while the run writes into it and marked
RUN_INCOMPLETE until every output is written, so a killed run, rerun, ends with the same outputs. Per-sample verdicts
and label histograms are kept in the data's label cache (<data_dir>/.roadseg_cache, or --label_cache_dir), shared with
run_finetune.py and run_eval.py, so a rerun with other weights or another budget, or a fine-tuning run on the same
tree, reads no image and decodes no label map. The split options of the data source (--train_fraction,
--val_fraction, --test_fraction, --split_by) do not apply here; --num_workers sets the processes that check samples.

With --label_source model --model_name_or_path M the histograms come from the maps M predicts (no masks needed:
an IDD leftImg8bit tree alone, --image_dir alone, a dataset without labels); --delta weighs M's uncertainty and
--strategy diversity picks by k-center greedy on M's encoder embeddings. One cached model pass gives all three;
`accelerate launch run_selection.py ...` shards it across processes.
"""

from __future__ import annotations

from roadseg_utils.versions import check_versions

# First: with too old a torch, transformers or accelerate the imports below may fail, or training may fail later.
check_versions("run_selection.py")

import json
import logging as std_logging
import re
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import HfArgumentParser
from transformers.utils import logging

from roadseg_utils.atomic import write_text_atomically
from roadseg_utils.cli import CommandLineError, one_line, parse_script_arguments
from roadseg_utils.data import DataError, DataSourceArguments, label_cache_path, source_label_set
from roadseg_utils.labels import LabelSet
from roadseg_utils.modeling import TINY_MODEL, load_model
from roadseg_utils.output_dir import INCOMPLETE_FILE, IncompleteMarker, OutputDirError, OutputLock, prepare_output_dir
from roadseg_utils.selection import (
    FORMULA,
    MANIFEST_CSV,
    MANIFEST_JSON,
    PLOT_FILES,
    REPORT_FILE,
    CandidatePool,
    ClassStats,
    ModelScores,
    Selection,
    SelectionArguments,
    SelectionError,
    check_json_arguments,
    check_materialize_target,
    check_model_labels,
    compute_class_stats,
    compute_model_scores,
    load_candidate_pool,
    materialize_dataset,
    materialize_files,
    process_state,
    push_subset_to_hub,
    remove_stale_staging,
    render_report,
    resolve_budget,
    resolve_rare_classes,
    select_images,
    write_manifest,
    write_plots,
)

logger = logging.get_logger("run_selection")

SCRIPT = "run_selection.py"
DESCRIPTION = (
    "Rank the training pool of a labelled dataset and keep the K most informative images. The pool is the train "
    "split as found: an IDD tree's leftImg8bit/train, every image of flat image/mask folders, or the train split of "
    "a Hugging Face dataset or pickle; validation and test images are never ranked. Each image gets CDS (class "
    "diversity), RCS (rare classes) and ICS (sequence size) from its label histogram, and "
    f"{FORMULA}. Writes manifest.json/.csv, report.md and plots to --output_dir; sample checks and label histograms "
    "are kept in the data's label cache (shared with fine-tuning and evaluation), so reruns with other weights "
    "read no image and decode nothing."
)
# The temporary files `atomic` writes beside an output (".<name>.<uuid4 hex>.tmp"), left behind by a killed run.
_OUTPUTS = (MANIFEST_JSON, MANIFEST_CSV, REPORT_FILE, INCOMPLETE_FILE, *PLOT_FILES)
_TEMPORARY = re.compile(r"\.(" + "|".join(map(re.escape, _OUTPUTS)) + r")\.[0-9a-f]{32}\.tmp")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_data_folder(data_args: DataSourceArguments) -> None:
    """A --data_dir that is missing or a file: one line before anything is read."""
    if data_args.data_dir is not None and not Path(data_args.data_dir).expanduser().is_dir():
        problem = "is not a folder" if Path(data_args.data_dir).expanduser().exists() else "does not exist"
        raise DataError(f"--data_dir {data_args.data_dir}: {problem}")


def _materialize_target(
    data_args: DataSourceArguments, selection_args: SelectionArguments, output_dir: Path, cache_dir: Path
) -> Path | None:
    """Where --materialize writes, checked before any work; None without --materialize."""
    mode = selection_args.materialize
    if mode == "none":
        return None
    if mode in ("symlink", "copy") and data_args.source_kind() not in ("idd", "flat"):
        raise SelectionError(
            f"--materialize {mode} mirrors files, but {data_args.describe_source()} is a Hugging Face dataset or "
            "pickle; use --materialize hf_dataset"
        )
    target = Path(selection_args.materialize_dir or output_dir / "subset").expanduser().resolve()
    # The subset replaces its folder as a whole: it must not hold this run's outputs or its data.
    for name, folder in (("--output_dir", output_dir), ("--label_cache_dir", cache_dir)):
        if _within(folder.resolve(), target):
            raise SelectionError(f"--materialize_dir {target}: holds {name} {folder}; choose a folder of its own")
    for value in (data_args.data_dir, data_args.image_dir, data_args.mask_dir, data_args.dataset_name):
        source = Path(value).expanduser() if value is not None else None
        if source is not None and source.exists() and _within(source.resolve(), target):
            raise SelectionError(f"--materialize_dir {target}: holds the data being selected from ({value})")
    check_materialize_target(target)
    return target


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary output files of a killed run in ``folder`` (call it holding the folder's lock)."""
    for entry in folder.iterdir():
        if _TEMPORARY.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def _check_rare_classes(selection_args: SelectionArguments, label_set: LabelSet) -> None:
    # An unknown name is found now rather than after every label map is decoded.
    if selection_args.rare_classes:
        resolve_rare_classes(np.ones(label_set.num_labels), label_set, selection_args.rare_classes)


def _model_loader(selection_args: SelectionArguments, label_set: LabelSet) -> Callable[[], torch.nn.Module]:
    """What builds the model of the model pass when it is first needed (never when every prediction is cached)."""
    name = selection_args.model_name_or_path

    def load() -> torch.nn.Module:
        if name == TINY_MODEL:
            torch.manual_seed(selection_args.seed)  # the fingerprint of `tiny` is its seed
            return load_model(name, label_set)
        return load_model(name, None)

    return load


def _model_scores(pool: CandidatePool, label_set: LabelSet, selection_args: SelectionArguments, cache_dir: Path,
                  on_bad_sample: str) -> ModelScores:
    return compute_model_scores(
        pool, label_set, selection_args.model_name_or_path, cache_dir, _model_loader(selection_args, label_set),
        selection_args.per_device_batch_size, selection_args.prediction_size, selection_args.model_precision,
        on_bad_sample, selection_args.seed)


def _share_model_pass(data_args: DataSourceArguments, selection_args: SelectionArguments, label_set: LabelSet,
                      cache_path: Path, state: PartialState) -> dict[str, object]:
    """A process other than the main one under ``accelerate launch``: infer its shard of the pool, write nothing."""
    from_labels = selection_args.label_source == "labels"
    pool = load_candidate_pool(data_args, label_set, selection_args.seed, require_labels=from_labels)
    state.wait_for_everyone()  # the main process has checked every sample and cached the verdicts
    if from_labels:
        pool = compute_class_stats(pool, label_set, cache_path, data_args.num_workers,
                                   data_args.on_bad_sample, progress=False).pool
    _model_scores(pool, label_set, selection_args, cache_path.parent, data_args.on_bad_sample)
    return {}


def _read_study(path: str | None) -> dict[str, object] | None:
    """The study results of --study_results, checked before any work."""
    if path is None:
        return None
    try:
        study = json.loads(Path(path).expanduser().read_text())
        if not isinstance(study, dict) or not isinstance(study.get("results"), list):
            raise ValueError("no 'results' list")
    except (OSError, ValueError) as err:
        raise SelectionError(f"--study_results {path}: not a study of benchmarks/selection_study.py ({err})") from err
    return study


def run(data_args: DataSourceArguments, selection_args: SelectionArguments) -> dict[str, object]:
    """Check the arguments and folders, then rank, select and write every output; returns the paths and counts."""
    start = time.perf_counter()
    label_set = source_label_set(data_args)
    _check_rare_classes(selection_args, label_set)
    if selection_args.needs_model():
        check_model_labels(selection_args.model_name_or_path, label_set)
    study = _read_study(selection_args.study_results)
    _check_data_folder(data_args)
    output_dir = prepare_output_dir(selection_args.output_dir)
    if data_args.label_cache_dir is not None:
        prepare_output_dir(data_args.label_cache_dir, "--label_cache_dir")
    cache_path = label_cache_path(data_args)
    if cache_path.exists() and not cache_path.is_file():
        raise SelectionError(f"{cache_path}: is not a file, so the label cache cannot be written there")
    cache_dir = cache_path.parent  # the model's predictions are kept beside the tree's label cache
    target = _materialize_target(data_args, selection_args, output_dir, cache_dir)
    state = process_state() if selection_args.needs_model() else None
    if state is not None and not state.is_main_process:
        return _share_model_pass(data_args, selection_args, label_set, cache_path, state)
    with ExitStack() as held:
        held.enter_context(OutputLock(output_dir, SCRIPT))
        if target is not None and target.parent != output_dir.resolve():
            held.enter_context(OutputLock(prepare_output_dir(target.parent, "--materialize_dir"), SCRIPT))
        _remove_stale_temporaries(output_dir)
        if target is not None:
            remove_stale_staging(target)
        from_labels = selection_args.label_source == "labels"
        pool = load_candidate_pool(data_args, label_set, selection_args.seed, require_labels=from_labels)
        resolve_budget(len(pool), selection_args.num_images, selection_args.fraction, pool.source)
        model_scores = None
        if from_labels:
            stats = compute_class_stats(pool, label_set, cache_path, data_args.num_workers, data_args.on_bad_sample)
        if state is not None:
            state.wait_for_everyone()  # the other processes read the checked samples from the cache
            model_scores = _model_scores(stats.pool if from_labels else pool, label_set, selection_args, cache_dir,
                                         data_args.on_bad_sample)
            stats = _with_model_skips(stats, model_scores) if from_labels else model_scores.stats
        selection = select_images(
            stats, selection_args, label_set,
            uncertainty=model_scores.uncertainty if model_scores else None,
            embeddings=model_scores.embeddings if model_scores else None,
            model=model_scores.model if model_scores else None)
        chosen = [i for i, is_selected in enumerate(selection.selected) if is_selected]
        try:
            with IncompleteMarker(output_dir, SCRIPT):
                outputs = _write_outputs(selection, label_set, selection_args, output_dir, study)
                if target is not None:
                    _materialize(stats, chosen, label_set, selection_args.materialize, target, data_args)
                    outputs["subset"] = target
        except OSError as err:  # a full or failing disk: name the folder, whichever file it was
            raise SelectionError(f"{output_dir}: cannot write the outputs ({err})") from err
    inferred = f", {model_scores.inferred} run through the model here" if model_scores else ""
    logger.info(
        f"ranked {len(stats.pool)} images ({stats.decoded} samples checked, {len(stats.pool) - stats.decoded} "
        f"from the cache{inferred}), selected {len(chosen)} by {selection_args.strategy} in "
        f"{time.perf_counter() - start:.2f} s"
    )
    outputs.update(num_candidates=len(stats.pool), num_selected=len(chosen), decoded=stats.decoded)
    if selection_args.push_to_hub:
        url = push_subset_to_hub(target, selection_args.hub_dataset_id, selection_args.hub_private)
        logger.info(f"pushed the subset to {url}")
        outputs["hub_url"] = url
    return outputs


def _with_model_skips(stats: ClassStats, model_scores: ModelScores) -> ClassStats:
    """Label statistics restricted to the images the model pass could read (it skips unreadable ones)."""
    kept = model_scores.stats.pool.paths
    if len(kept) == len(stats.pool):
        return stats
    index = {path: i for i, path in enumerate(stats.pool.paths)}
    rows = [index[path] for path in kept]
    return ClassStats(stats.pool.subset(rows), stats.histograms[rows], stats.skipped + model_scores.stats.skipped,
                      stats.decoded)


def _write_outputs(
    selection: Selection, label_set: LabelSet, selection_args: SelectionArguments, output_dir: Path,
    study: dict[str, object] | None = None,
) -> dict[str, object]:
    """manifest.json/.csv, the plots (or none left from an earlier run) and report.md, each written atomically."""
    json_path, csv_path = write_manifest(selection, output_dir)
    if selection_args.plots:
        plots = write_plots(selection, label_set, output_dir)
    else:
        plots = []
        for name in PLOT_FILES:  # an earlier run's plots would not show this selection
            (output_dir / name).unlink(missing_ok=True)
    report_path = output_dir / REPORT_FILE
    write_text_atomically(report_path, render_report(selection, label_set, [p.name for p in plots], study))
    return {"manifest": json_path, "manifest_csv": csv_path, "report": report_path, "plots": plots}


def _materialize(stats: ClassStats, chosen: list[int], label_set: LabelSet, mode: str, target: Path,
                 data_args: DataSourceArguments) -> None:
    """Write the chosen images to ``target`` (replaced as a whole); a failed write is one line."""
    try:
        if mode == "hf_dataset":
            materialize_dataset(stats.pool, chosen, label_set, target)
            load_hint = f"--dataset_name {target}"
        else:
            materialize_files([stats.pool.records[i] for i in chosen], target, mode)
            load_hint = f"--data_dir {target}" + (" (with the same --image_dir/--mask_dir)"
                                                   if data_args.source_kind() == "flat" else "")
    except OSError as err:
        raise SelectionError(f"{target}: cannot write the subset ({err})") from err
    logger.info(f"wrote the {len(chosen)} selected images to {target}; load them with {load_hint}")


def check_argument_file(path: str, values: dict[str, object]) -> None:
    """Refuse an argument file with unknown options, values of the wrong type or a required option missing."""
    check_json_arguments(path, values, (DataSourceArguments, SelectionArguments))


def parse_arguments(argv: list[str]) -> tuple[DataSourceArguments, SelectionArguments]:
    """The two argument groups from the command line or from one JSON file; a bad value is a one-line usage error."""
    parser = HfArgumentParser((DataSourceArguments, SelectionArguments), description=DESCRIPTION)
    try:
        (data_args, selection_args), _ = parse_script_arguments(parser, argv, check_argument_file)
    except (CommandLineError, SelectionError) as err:
        parser.error(str(err))
    return data_args, selection_args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parse arguments (command line or one JSON file), run the selection and print where the outputs are."""
    data_args, selection_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                            level=std_logging.INFO, stream=sys.stderr)
    logging.set_verbosity_warning()
    try:
        outputs = run(data_args, selection_args)
    except (ValueError, OSError, OutputDirError) as err:
        # DataError, SelectionError and OutputDirError name the file or option: one line, no traceback.
        sys.exit(f"error: {one_line(err)}")
    except KeyboardInterrupt:
        print(f"error: interrupted; rerun the same command to complete {selection_args.output_dir}", file=sys.stderr)
        sys.exit(130)
    if outputs:  # empty on the helper processes of accelerate launch
        print(f"selected {outputs['num_selected']} of {outputs['num_candidates']} images: {outputs['manifest']}, "
              f"{outputs['report']}")
    return outputs


if __name__ == "__main__":
    main()
