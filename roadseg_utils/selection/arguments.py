"""The options of run_selection.py (`SelectionArguments`), their checks and the allowed modes and strategies."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from ..data import DataError

STRATEGIES = ("weighted", "random", "rare_class_sampling", "diversity")
LABEL_SOURCES = ("labels", "model")
MODEL_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CDS_MODES = ("count", "entropy")
RCS_MODES = ("neglog", "count")
ICS_MODES = ("count", "inverse")
MATERIALIZE_MODES = ("none", "symlink", "copy", "hf_dataset")
DEFAULT_NUM_IMAGES = 1500


class SelectionError(DataError):
    """A selection option is invalid or does not fit the data (scripts print it as one line)."""


def check_weights(alpha: float, beta: float, gamma: float, delta: float = 0.0) -> None:
    """Raise `SelectionError` unless the score weights are finite, >= 0 and not all 0."""
    values = {"alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta}
    bad = [f"{name}={value}" for name, value in values.items() if not (np.isfinite(value) and value >= 0)]
    if bad:
        raise SelectionError(f"weights must be finite and >= 0, got {', '.join(bad)}")
    if alpha == beta == gamma == delta == 0:
        raise SelectionError("alpha, beta, gamma and delta are all 0: at least one weight must be positive")


@dataclass
class SelectionArguments:
    """How run_selection.py scores, picks and writes the subset of the training pool."""

    output_dir: str = field(
        metadata={"help": "Folder for manifest.json/.csv, report.md and the plots."}
    )
    num_images: int | None = field(
        default=None,
        metadata={"help": f"Budget K: images to keep from the training pool (default {DEFAULT_NUM_IMAGES}). "
                  "Asking for more than the pool holds is an error."},
    )
    fraction: float | None = field(
        default=None, metadata={"help": "Budget as a share of the training pool (0 < f <= 1), instead of --num_images."}
    )
    strategy: str = field(
        default="weighted",
        metadata={"help": "weighted: top K by the weighted score (ties: path ascending); random: K images drawn "
                  "uniformly; rare_class_sampling: draw a class with probability proportional to "
                  "exp((1 - f_c) / T), then an unpicked image containing it, until K are picked. "
                  "diversity: k-center greedy (core-set) over embeddings pooled from the model's frozen encoder "
                  "(needs --model_name_or_path). report.md compares them at the same K.",
                  "choices": list(STRATEGIES)},
    )
    alpha: float = field(default=0.4, metadata={"help": "Weight of CDS (class diversity), >= 0."})
    beta: float = field(default=0.4, metadata={"help": "Weight of RCS (rare-class score), >= 0."})
    gamma: float = field(default=0.2, metadata={"help": "Weight of ICS (sequence size), >= 0."})
    delta: float = field(
        default=0.0,
        metadata={"help": "Weight of the model's uncertainty (mean per-pixel entropy of its class probabilities), "
                  ">= 0; needs --model_name_or_path. 0 keeps the three-term score exact."},
    )
    label_source: str = field(
        default="labels",
        metadata={"help": "Where class histograms come from: 'labels' (the masks) or 'model' (the maps "
                  "--model_name_or_path predicts at --prediction_size; no masks needed).",
                  "choices": list(LABEL_SOURCES)},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model for --label_source model, --delta > 0 or --strategy diversity: a fine-tuned folder "
                  "or Hub id (or 'tiny'). Its predictions are cached, keyed by file and model fingerprint."},
    )
    per_device_batch_size: int = field(default=8, metadata={"help": "Images per forward pass of the model pass."})
    prediction_size: int = field(
        default=256,
        metadata={"help": "Shortest edge images are decoded at for the model pass; histograms are counted on the "
                  "mask-logit grid, a quarter of that side."},
    )
    model_precision: str = field(
        default="auto",
        metadata={"help": "Model pass precision: auto = bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU.",
                  "choices": list(MODEL_PRECISIONS)},
    )
    diversity_start: int = field(
        default=0,
        metadata={"help": "--strategy diversity starts from this many top-weighted images (0: one seeded pick)."},
    )
    study_results: str | None = field(
        default=None,
        metadata={"help": "study.json of benchmarks/selection_study.py: report.md shows where this selection's "
                  "strategy stands among the strategies it measured."},
    )
    cds_mode: str = field(
        default="entropy",
        metadata={"help": "CDS: 'entropy' = Shannon entropy (nats) of the image's class pixel distribution; "
                  "'count' = classes present with >= --min_pixels pixels (the seed's).", "choices": list(CDS_MODES)},
    )
    rcs_mode: str = field(
        default="count",
        metadata={"help": "RCS: 'count' = present classes from the rare set; 'neglog' = sum over present classes "
                  "of -ln(share of pool images with the class) (the seed's).", "choices": list(RCS_MODES)},
    )
    ics_mode: str = field(
        default="inverse",
        metadata={"help": "ICS: 'inverse' = 1 / pool images in the image's sequence folder, spreading the budget "
                  "over sequences; 'count' = that number (the seed's, favours long sequences). The seed's score "
                  "is --cds_mode count --rcs_mode neglog --ics_mode count.", "choices": list(ICS_MODES)},
    )
    min_pixels: int = field(default=1, metadata={"help": "Pixels a class needs in an image to count as present."})
    rare_threshold: float = field(
        default=0.1, metadata={"help": "Automatic rare set: classes in fewer than this share of pool images."}
    )
    rare_classes: list[str] | None = field(
        default=None,
        metadata={"help": "Name the rare set instead (class names or ids, e.g. --rare_classes bus 'traffic light')."},
    )
    temperature: float = field(default=0.01, metadata={"help": "T of rare_class_sampling (> 0)."})
    seed: int = field(default=0, metadata={"help": "Seed of random and rare_class_sampling and of --max_samples."})
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (--no_plots to skip)."})
    materialize: str = field(
        default="none",
        metadata={"help": "Write the subset: 'symlink'/'copy' mirror the source tree (IDD: leftImg8bit/ and every "
                  "gtFine/ file of the frame), 'hf_dataset' a datasets folder (save_to_disk).",
                  "choices": list(MATERIALIZE_MODES)},
    )
    materialize_dir: str | None = field(
        default=None, metadata={"help": "Where --materialize writes (default: <output_dir>/subset)."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Publish the hf_dataset subset to --hub_dataset_id (implies hf_dataset)."}
    )
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repository, e.g. user/idd-1500."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub dataset as private."})

    def __post_init__(self) -> None:
        for name, allowed in (("strategy", STRATEGIES), ("cds_mode", CDS_MODES), ("rcs_mode", RCS_MODES),
                              ("ics_mode", ICS_MODES), ("materialize", MATERIALIZE_MODES),
                              ("label_source", LABEL_SOURCES), ("model_precision", MODEL_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise SelectionError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_weights(self.alpha, self.beta, self.gamma, self.delta)
        if self.needs_model() and not self.model_name_or_path:
            raise SelectionError("--label_source model, --delta > 0 and --strategy diversity need --model_name_or_path")
        for name in ("per_device_batch_size", "prediction_size"):
            if getattr(self, name) < 1:
                raise SelectionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.diversity_start < 0:
            raise SelectionError(f"diversity_start must be >= 0, got {self.diversity_start}")
        if self.num_images is not None and self.fraction is not None:
            raise SelectionError("give --num_images or --fraction, not both")
        if self.num_images is not None and self.num_images < 1:
            raise SelectionError(f"num_images must be at least 1, got {self.num_images}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SelectionError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_pixels < 1:
            raise SelectionError(f"min_pixels must be at least 1, got {self.min_pixels}")
        if not 0 < self.rare_threshold <= 1:
            raise SelectionError(f"rare_threshold must be in (0, 1], got {self.rare_threshold}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise SelectionError(f"temperature must be > 0, got {self.temperature}")
        if self.seed < 0:
            raise SelectionError(f"seed must be >= 0, got {self.seed}")
        if self.push_to_hub:
            if not self.hub_dataset_id:
                raise SelectionError("--push_to_hub needs --hub_dataset_id (e.g. user/idd-subset)")
            if self.materialize in ("symlink", "copy"):
                raise SelectionError("--push_to_hub publishes an hf_dataset subset; use --materialize hf_dataset")
            self.materialize = "hf_dataset"

    def needs_model(self) -> bool:
        """Whether this run needs the model pass (predicted histograms, uncertainty or embeddings)."""
        return self.label_source == "model" or self.delta > 0 or self.strategy == "diversity"


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON value fits an option's annotation (bool is not a number; ints pass for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(option, value) for option in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_accepts(args[0], item) for item in value)
    return True  # other annotations are checked by the dataclass itself


def check_json_arguments(source: str, values: Any, classes: tuple[type, ...]) -> None:
    """Raise `SelectionError` naming ``source`` unless ``values`` is an object whose keys are options of
    ``classes`` with values of their types, and every required option is there."""
    if not isinstance(values, Mapping):
        raise SelectionError(f"{source}: expected a JSON object of options and values, got {type(values).__name__}")
    known: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for option in fields(cls):
            known[option.name] = hints[option.name]
            if option.default is MISSING and option.default_factory is MISSING and option.name not in values:
                raise SelectionError(f"{source}: the required option {option.name!r} is missing")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SelectionError(f"{source}: unknown options {unknown}")
    for name, value in values.items():
        if not _accepts(known[name], value):
            hint = str(known[name]).replace("<class '", "").replace("'>", "")
            raise SelectionError(f"{source}: {name} must be {hint}, got {value!r}")
