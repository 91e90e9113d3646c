#!/usr/bin/env python
"""Score a Mask2Former checkpoint on a labelled split at full resolution: metrics, report, pictures, IDD-format PNGs.

    python run_eval.py --model_name_or_path runs/ft --data_dir data/syn --output_dir runs/ev
    python run_eval.py eval_args.json
    accelerate launch run_eval.py --model_name_or_path runs/ft --data_dir data/syn --output_dir runs/ev

Predictions are scored at the original size of each ground-truth map, by the rule every scoring path shares
(roadseg_utils.inference): the saved image processor makes the inputs and upstream's semantic post-processing the
label maps, so the scores equal the model card's and ``pipeline()``'s. Under ``accelerate launch`` every process
scores its own shard of the split (no sample twice), the confusion matrices are summed across processes, and only
the main process writes files.
"""

from __future__ import annotations

from roadseg_utils.versions import check_versions

# First: with too old a torch, transformers or accelerate the imports below may fail, or training may fail later.
check_versions("run_eval.py")

import logging as std_logging
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from accelerate import Accelerator
from transformers import HfArgumentParser, set_seed
from transformers.utils import logging

# Importing roadseg_utils sets NO_ALBUMENTATIONS_UPDATE=1 before albumentations loads (else it asks PyPI for updates).
from roadseg_utils.atomic import write_text_atomically
from roadseg_utils.card import model_index_dataset_type, model_index_results, update_model_card_eval_results
from roadseg_utils.cli import CommandLineError, fail, one_line, parse_script_arguments
from roadseg_utils.data import (
    SPLIT_ALIASES,
    DataError,
    DataSourceArguments,
    EmptyDatasetError,
    dataset_column,
    load_segmentation_dataset,
    source_label_set,
    with_sample_transform,
)
from roadseg_utils.eval_loop import score_shards
from roadseg_utils.evaluation import (
    EvalInputError,
    StagedOutputs,
    build_results,
    check_protocol,
    class_names,
    overlay_indices,
    protocol_summary,
    resolve_label_set,
    write_outputs,
)
from roadseg_utils.export import README_FILE, StagedExport, export_lookup, export_paths, export_readme
from roadseg_utils.hub import HubPublishError, hub_is_reachable, push_files_to_hub
from roadseg_utils.inference import MAX_TTA_SCALES, TTA_CHOICES, parse_tta_scales
from roadseg_utils.labels import IDD_LEVELS, LabelSet, LabelSetError, idd_level_of
from roadseg_utils.metrics import compute_segmentation_metrics
from roadseg_utils.modeling import (
    TINY_MODEL,
    ModelLoadError,
    check_model_folder,
    load_image_processor,
    load_model,
    processor_shortest_edge,
)
from roadseg_utils.output_dir import OutputDirError, prepare_output_dir
from roadseg_utils.parallel import default_loader_workers, limit_loader_threads
from roadseg_utils.protocol import DEFAULT_RESOLUTION, PROTOCOL_CHOICES, PROTOCOL_FRAMES, protocol_results
from roadseg_utils.transforms import make_eval_transform

logger = logging.get_logger("run_eval")
SCRIPT = "run_eval.py"


@dataclass
class EvalArguments:
    """What to evaluate, how, and what to write (the data source comes from ``DataSourceArguments``)."""

    model_name_or_path: str = field(
        metadata={"help": "A saved model folder (config.json + weights), a Hub model id, or 'tiny' (offline demo)."}
    )
    output_dir: str = field(metadata={"help": "Folder for eval_results.json, eval_report.md, plots and overlays."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    split: str = field(
        default="test",
        metadata={"help": "Split to score: test (default), validation or train, built by the same split logic and "
                  "--seed as fine-tuning."},
    )
    batch_size: int = field(default=4, metadata={"help": "Images per forward pass (per process)."})
    eval_shortest_edge: int | None = field(
        default=None,
        metadata={"help": "Shortest edge of images fed to the model (aspect kept). Default: the checkpoint's image "
                  "processor size (shortest_edge); 0 feeds the original size."},
    )
    working_size: int | None = field(
        default=None,
        metadata={"help": "Cap on the shortest edge at which mask logits are upsampled and scored; the label map "
                  "is then resized to the ground-truth size with nearest neighbours. Default: the ground-truth "
                  "size itself (saves memory at 1080p when set, e.g. 540)."},
    )
    tta: str = field(
        default="none",
        metadata={"help": "Test-time augmentation: none, or flip (average class scores of the image and its "
                  "horizontal mirror).", "choices": list(TTA_CHOICES)},
    )
    tta_scales: str | None = field(
        default=None,
        metadata={"help": f"Multi-scale test-time augmentation: up to {MAX_TTA_SCALES} comma-separated factors of "
                  "the input size, e.g. 0.5,0.75,1.0,1.25,1.5,1.75; class probabilities are averaged over the "
                  "scales (and their mirrors with --tta flip). Default: the one input size."},
    )
    tta_tiling: bool = field(
        default=True,
        metadata={"help": "Run --tta_scales views larger than the single-scale input in full-height strips no "
                  "larger than it, so memory stays near single-scale. False runs each view whole (more context; "
                  "memory grows with the largest scale squared)."},
    )
    protocol: str = field(
        default="native",
        metadata={"help": "native: count every pixel at its original size. idd: also score as the IDD leaderboard "
                  "(the official AutoNUE script) does, every frame resized to --protocol_resolution first; the "
                  "native scores stay. IDD level-3 models only.", "choices": list(PROTOCOL_CHOICES)},
    )
    protocol_resolution: int = field(
        default=DEFAULT_RESOLUTION,
        metadata={"help": "The official script's --res for --protocol idd: 1080 (1920x1080), 720 (1280x720), 480 "
                  "(858x480) or 240 (426x240).", "choices": sorted(PROTOCOL_FRAMES, reverse=True)},
    )
    num_overlays: int = field(
        default=8, metadata={"help": "Number of image | ground truth | prediction pictures written to overlays/."}
    )
    export_predictions: str | None = field(
        default=None,
        metadata={"help": "Folder receiving <sequence>/<frame>_gtFine_labellevel<N>Ids.png predictions at the "
                  "original size, the layout the official IDD evaluation reads."},
    )
    export_level: int | None = field(
        default=None,
        metadata={"help": "IDD level (1-4) of the exported ids; at most the model's level (default: the model's)."},
    )
    update_model_card: bool = field(
        default=False,
        metadata={"help": "Write the results as model-index metadata into the checkpoint's README.md (a Hub "
                  "model's card is written to --output_dir/README.md)."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Push the updated model card, eval_results.json, eval_report.md and the plots to "
                  "--hub_model_id (implies --update_model_card)."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repository to push to (default: --model_name_or_path when it is a Hub id)."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the stored login / HF_TOKEN); never logged or written."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    seed: int = field(default=42, metadata={"help": "Seed of the split (use the fine-tuning seed) and of 'tiny'."})
    dataloader_num_workers: int = field(
        default_factory=default_loader_workers,
        metadata={"help": "Processes that decode and resize images while the model runs (0: inline; default: the "
                  "usable cores shared by this node's processes, at most 8)."},
    )

    def __post_init__(self) -> None:
        canonical = SPLIT_ALIASES.get(self.split.lower())
        if canonical is None:
            raise EvalInputError(f"--split must be test, validation or train, got {self.split!r}")
        self.split = canonical
        if self.tta not in TTA_CHOICES:
            raise EvalInputError(f"--tta must be one of {', '.join(TTA_CHOICES)}, got {self.tta!r}")
        try:
            # The parsed factors (None: single scale); an argument file may also give a list of numbers.
            self.scales = None if self.tta_scales is None else parse_tta_scales(self.tta_scales)
        except ValueError as err:
            raise EvalInputError(f"--tta_scales: {err}") from err
        for name in ("batch_size", "working_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalInputError(f"--{name} must be at least 1, got {value}")
        for name in ("eval_shortest_edge", "num_overlays", "dataloader_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise EvalInputError(f"--{name} must not be negative, got {value}")
        if self.export_level is not None and self.export_level not in IDD_LEVELS:
            raise EvalInputError(f"--export_level must be one of {IDD_LEVELS}, got {self.export_level}")
        if self.protocol not in PROTOCOL_CHOICES:
            raise EvalInputError(f"--protocol must be one of {', '.join(PROTOCOL_CHOICES)}, got {self.protocol!r}")
        if self.protocol_resolution not in PROTOCOL_FRAMES:
            raise EvalInputError(f"--protocol_resolution must be one of {sorted(PROTOCOL_FRAMES, reverse=True)}, got "
                                 f"{self.protocol_resolution!r}")
        if self.push_to_hub:
            self.update_model_card = True
        if self.update_model_card and self.model_name_or_path == TINY_MODEL:
            raise EvalInputError("--update_model_card needs a saved model folder or a Hub id, not 'tiny'")

    def __repr__(self) -> str:
        # The token must never reach a log line.
        shown = {k: ("<hidden>" if k == "hub_token" and v else v) for k, v in asdict(self).items()}
        return f"EvalArguments({shown})"


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[EvalArguments, DataSourceArguments]:
    """The two argument dataclasses from the command line or one JSON file."""
    parser = HfArgumentParser((EvalArguments, DataSourceArguments))
    (eval_args, data_args), _ = parse_script_arguments(parser, sys.argv[1:] if argv is None else argv)
    return eval_args, data_args


def choose_label_set(eval_args: EvalArguments, data_args: DataSourceArguments) -> tuple[LabelSet, Any]:
    """The label set to score with, and the model when it had to be loaded to know it (a Hub id), else None.

    A local folder is checked from its headers and its config.json read, so a bad folder or a label set that
    disagrees with the model stops the run before any weight or image is read. Without --label_set, the data's own
    label set (a dataset's id2label.json, else IDD level 3) is used when it names the model's classes alike.
    """
    name = eval_args.model_name_or_path
    data_label_set = source_label_set(data_args)
    if name == TINY_MODEL:
        return data_label_set, None
    local = Path(name).expanduser()
    model = None
    id2label = check_model_folder(local).get("id2label") if local.exists() or name.startswith((".", "/", "~")) else None
    if not id2label:
        model = load_model(name, None, eval_args.model_revision, eval_args.hub_token, eval_args.cache_dir)
        id2label = model.config.id2label
    label_set = resolve_label_set(id2label, data_args.label_set, name)
    if data_args.label_set is None and class_names(data_label_set.id2label) == class_names(label_set.id2label):
        label_set = data_label_set
    return label_set, model


def check_before_work(eval_args: EvalArguments) -> None:
    """Refuse what would fail only after the scoring: a Hub push offline, a model folder that cannot take a card."""
    local = Path(eval_args.model_name_or_path).expanduser()
    if local.is_dir() and local.resolve() == Path(eval_args.output_dir).expanduser().resolve():
        raise EvalInputError(f"--output_dir {eval_args.output_dir} is the model folder; write the evaluation into "
                             "another folder (e.g. a subfolder), so its files never mix with the model's")
    if eval_args.push_to_hub:
        if eval_args.hub_model_id is None and local.is_dir():
            raise EvalInputError("--push_to_hub needs --hub_model_id for a local model folder")
        if not hub_is_reachable():
            raise EvalInputError("--push_to_hub: the Hugging Face Hub is not reachable (offline?)")
    if eval_args.update_model_card and local.is_dir():
        prepare_output_dir(local, "--update_model_card: the model folder")


def score_checkpoint(eval_args: EvalArguments, data_args: DataSourceArguments) -> dict[str, Any]:
    """Check, load, predict, score and write every output; returns the eval_results.json payload.

    The main process locks ``--output_dir`` (and the export's staging folder) for the whole run, writes into
    staging folders, and moves the outputs into place only at the end.
    """
    accelerator = Accelerator()
    is_main = accelerator.is_main_process
    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for logger_name in ("run_eval", "roadseg_utils"):
        std_logging.getLogger(logger_name).setLevel(std_logging.INFO if is_main else std_logging.WARNING)
    set_seed(eval_args.seed)
    export = None
    if eval_args.export_predictions:
        export = StagedExport(eval_args.export_predictions, eval_args.output_dir, SCRIPT)
    with ExitStack() as stack:
        outputs = None
        if is_main:
            check_before_work(eval_args)
            outputs = stack.enter_context(StagedOutputs(eval_args.output_dir, SCRIPT))
            if export:
                stack.enter_context(export)
        scored = score_split(eval_args, data_args, accelerator, export)
        if is_main:
            write_outputs(outputs.staging, scored.results, scored.matrix, scored.metrics, scored.label_set,
                          scored.dataset, overlay_indices(len(scored.dataset), eval_args.num_overlays),
                          scored.overlay_predictions)
            if export:
                write_text_atomically(export.folder / README_FILE, export_readme(
                    export.target, scored.results["num_images"], scored.results["export_level"],
                    eval_args.model_name_or_path, eval_args.split, data_args.describe_source()))
            outputs.commit(*([export.swap_in] if export else []))
            print_summary(scored.results, outputs.folder)
    if is_main and eval_args.update_model_card:
        publish_results(scored.results, eval_args, data_args)
    accelerator.wait_for_everyone()
    return scored.results


class ScoredSplit(NamedTuple):
    """What `score_split` hands to the writers."""

    results: dict[str, Any]
    matrix: np.ndarray
    metrics: dict[str, Any]
    label_set: LabelSet
    dataset: Any
    overlay_predictions: dict[int, np.ndarray]


def score_split(
    eval_args: EvalArguments,
    data_args: DataSourceArguments,
    accelerator: Accelerator,
    export: StagedExport | None,
) -> ScoredSplit:
    """Score this process's shard of the split (the results, matrix and metrics are the whole split's).

    The main process writes the exported predictions into ``export.folder`` as they come.
    """
    name = eval_args.model_name_or_path
    label_set, model = choose_label_set(eval_args, data_args)
    check_protocol(eval_args.protocol, label_set)
    lookup, export_level = export_lookup(label_set, eval_args.export_level)
    # The saved image processor makes the inputs, as in training-time evaluation and pipeline(); only its size may
    # be overridden.
    if eval_args.eval_shortest_edge is None:
        processor = load_image_processor(name)
    elif eval_args.eval_shortest_edge:
        processor = load_image_processor(name, shortest_edge=eval_args.eval_shortest_edge, do_resize=True)
    else:
        processor = load_image_processor(name, do_resize=False)
    eval_shortest_edge = processor_shortest_edge(processor) if processor.do_resize else None

    # The split, and which of its images get an overlay or an exported prediction.
    # The main process validates (or reads the label cache) and writes the cache; the others then read it.
    with accelerator.main_process_first():
        splits = load_segmentation_dataset(data_args, label_set, eval_args.seed)
    dataset = splits[eval_args.split]
    if len(dataset) == 0:
        raise EvalInputError(f"{data_args.describe_source()}: the {eval_args.split} split has no labelled images")
    if model is None:
        model = load_model(name, label_set if name == TINY_MODEL else None, eval_args.model_revision,
                           eval_args.hub_token, eval_args.cache_dir)
    paths = dataset_column(dataset, "path")
    targets = None
    if export:
        targets = export_paths(export.folder, paths, dataset_column(dataset, "sequence"), export_level)
    overlays = overlay_indices(len(dataset), eval_args.num_overlays)
    logger.info(f"scoring {name} ({label_set.name}, {label_set.num_labels} classes) on {len(dataset)} "
                f"{eval_args.split} images of {data_args.describe_source()}; eval shortest edge "
                f"{eval_shortest_edge or 'original'}, TTA {eval_args.tta} at scales {list(eval_args.scales or [1.0])}, "
                f"{accelerator.num_processes} process(es) "
                f"on {accelerator.device}")

    transform = make_eval_transform(processor)
    limit_loader_threads(eval_args.dataloader_num_workers)
    scores = score_shards(
        model, with_sample_transform(dataset, transform), accelerator,
        num_labels=label_set.num_labels,
        on_bad_sample=data_args.on_bad_sample,
        source=data_args.describe_source(),
        batch_size=eval_args.batch_size,
        num_workers=eval_args.dataloader_num_workers,
        tta=eval_args.tta,
        working_size=eval_args.working_size,
        tta_scales=eval_args.scales,
        tta_tiling=eval_args.tta_tiling,
        overlays=set(overlays),
        export_targets=targets,
        export_lookup=lookup,
        protocol_resolution=eval_args.protocol_resolution if eval_args.protocol == "idd" else None,
    )
    skipped, matrix = scores.skipped, scores.matrix
    if len(skipped) == len(dataset):
        raise EmptyDatasetError(f"{data_args.describe_source()}: all {len(dataset)} images of the {eval_args.split} "
                                "split were skipped as bad samples")
    metrics = compute_segmentation_metrics(matrix, label_set.id2label, label_set.coarser)
    run = {
        "model": name,
        "data": data_args.describe_source(),
        "split": eval_args.split,
        "num_images": len(dataset) - len(skipped),
        "skipped_images": [paths[index] for index in skipped],
        "label_set": label_set.name,
        "num_labels": label_set.num_labels,
        "class_names": class_names(label_set.id2label),
        "seed": eval_args.seed,
        "eval_shortest_edge": eval_shortest_edge,
        "working_size": eval_args.working_size,
        "tta": eval_args.tta,
        "tta_scales": list(eval_args.scales) if eval_args.scales else None,
        "tta_tiling": eval_args.tta_tiling if eval_args.scales else None,
        "num_processes": accelerator.num_processes,
        "export_predictions": str(export.target) if export else None,
        "export_level": export_level if export else None,
    }
    results = build_results(matrix, metrics, label_set, run)
    results["protocol"] = eval_args.protocol
    if scores.protocol_matrix is not None:
        results["idd_protocol"] = protocol_results(scores.protocol_matrix, eval_args.protocol_resolution)
    return ScoredSplit(results, matrix, metrics, label_set, dataset, scores.overlay_predictions)


def print_summary(results: Mapping[str, Any], output_dir: Path) -> None:
    """The scores and where the files are, on stdout."""
    skipped = len(results["skipped_images"])
    print(
        f"{results['split']} mIoU {results['mean_iou']:.4f} on {results['num_images']} images"
        + (f" ({skipped} skipped as bad samples)" if skipped else "")
        + f" (best constant prediction: {results['constant_baseline_mean_iou']:.4f})\n"
        + protocol_summary(results)
        + f"results: {output_dir / 'eval_results.json'}, {output_dir / 'eval_report.md'}\n"
        f"pictures: {output_dir / 'overlays'}/, {output_dir / 'confusion_matrix.png'}, "
        f"{output_dir / 'per_class_iou.png'}"
    )


def publish_results(results: Mapping[str, Any], eval_args: EvalArguments, data_args: DataSourceArguments) -> None:
    """Write the model-index into the checkpoint's card and, with --push_to_hub, push it with the result files."""
    name = eval_args.model_name_or_path
    local = Path(name).expanduser()
    card_path = local / "README.md" if local.is_dir() else Path(eval_args.output_dir) / "README.md"
    repo_id = eval_args.hub_model_id or (None if local.is_dir() else name)
    # The same dataset type as run_finetune.py's card, so a new result replaces an older one of its split.
    dataset_type = model_index_dataset_type(idd_level_of(results["label_set"]))
    default_name = "IDD" if dataset_type == "idd" else Path(data_args.describe_source()).name
    dataset_name = data_args.dataset_name or default_name
    card = update_model_card_eval_results(
        card_path,
        model_index_results(results, results["split"], dataset_type, dataset_name, results["label_set"]),
        model_name=repo_id or local.name,
        base_card_repo=None if local.is_dir() else name,
        token=eval_args.hub_token,
    )
    logger.info(f"wrote {len(card.data.eval_results or [])} model-index results into {card_path}")
    if not eval_args.push_to_hub:
        return
    output_dir = Path(eval_args.output_dir)
    files = {"README.md": card_path}
    for file_name in ("eval_results.json", "eval_report.md", "confusion_matrix.png", "per_class_iou.png"):
        files[f"eval/{results['split']}/{file_name}"] = output_dir / file_name
    url = push_files_to_hub(
        repo_id, files, token=eval_args.hub_token, private=eval_args.hub_private_repo,
        commit_message=f"Evaluation on {results['split']}: mIoU {results['mean_iou']:.4f}",
    )
    logger.info(f"pushed the model card and evaluation files to {url}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; bad input ends with one line on stderr and exit status 1 (README, "Errors")."""
    try:
        eval_args, data_args = parse_arguments(argv)
        return score_checkpoint(eval_args, data_args)
    except (CommandLineError, EvalInputError, ModelLoadError, DataError, LabelSetError, OutputDirError,
            HubPublishError) as err:
        fail(SCRIPT, one_line(err))


if __name__ == "__main__":
    main()
