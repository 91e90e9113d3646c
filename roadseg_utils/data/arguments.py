"""`DataSourceArguments`, the data options every script shares, and the canonical split names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

SPLITS = ("train", "validation", "test")
# Column names Hugging Face segmentation datasets give their label maps ("annotation": scene_parse_150, ADE20k).
LABEL_COLUMN_CANDIDATES = ("label", "annotation", "segmentation", "mask")
# The file a Hugging Face dataset ships its class names in, as run_semantic_segmentation.py reads it.
ID2LABEL_FILE = "id2label.json"
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}


@dataclass
class DataSourceArguments:
    """Where the segmentation data comes from and how it is checked and split (shared by all scripts)."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Root of an IDD tree (leftImg8bit/, gtFine/), or the folder --image_dir/--mask_dir are in."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hugging Face Hub dataset, a save_to_disk folder, or an imagefolder directory "
                  "(metadata.jsonl with file_name and label_file_name)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of a Hugging Face dataset."})
    label_column: str | None = field(
        default=None,
        metadata={"help": "Label-map column of a Hugging Face dataset (default: the first of "
                  + ", ".join(LABEL_COLUMN_CANDIDATES) + " that holds label maps)."},
    )
    image_dir: str | None = field(
        default=None, metadata={"help": "Folder of images (flat layout; relative to --data_dir when given)."}
    )
    mask_dir: str | None = field(
        default=None, metadata={"help": "Folder of label-id masks paired with --image_dir by file stem."}
    )
    image_suffix: str | None = field(
        default=None,
        metadata={"help": "Ending that marks image files and is cut off to get the shared stem, e.g. '.jpg' "
                  "(default: any image extension)."},
    )
    mask_suffix: str | None = field(
        default=None,
        metadata={"help": "Ending appended to the stem to name its mask, e.g. '_mask.png' (default '.png'; "
                  "on an IDD tree '_gtFine_labellevel<N>Ids.png' for label set idd-level<N>)."},
    )
    pickle_path: str | None = field(
        default=None,
        metadata={"help": "Legacy pickle: a list of dicts with 'pixel_values' and 'label' (read with an allowlist)."},
    )
    label_set: str | None = field(
        default=None,
        metadata={"help": "idd-level1..idd-level4, or the path of an id2label JSON file (default: the "
                  f"{ID2LABEL_FILE} a Hugging Face dataset ships, else idd-level3)."},
    )
    on_bad_sample: str = field(
        default="error",
        metadata={"help": "What a bad sample does: 'error' stops with its file and problem, 'skip' logs and drops it.",
                  "choices": ["error", "skip"]},
    )
    train_fraction: float = field(default=0.855, metadata={"help": "Share of train in splits carved from train."})
    val_fraction: float = field(default=0.045, metadata={"help": "Share of validation when there is no val folder."})
    test_fraction: float = field(default=0.10, metadata={"help": "Share of test when there is no labelled test set."})
    split_by: str = field(
        default="image",
        metadata={"help": "Carve splits by 'image' or by whole 'sequence' (no sequence in two splits).",
                  "choices": ["image", "sequence"]},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many samples per split (seeded), for quick runs."}
    )
    num_workers: int | None = field(
        default=None, metadata={"help": "Processes for validating samples (default: CPU cores, at most 8)."}
    )
    label_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the label cache (each sample's size, label histogram and verdict, shared by "
                  "selection, fine-tuning and evaluation). Default: <data_dir>/.roadseg_cache, or a folder under the "
                  "Hugging Face datasets cache when the tree cannot be written."},
    )

    def __post_init__(self) -> None:
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if self.split_by not in ("image", "sequence"):
            raise ValueError(f"split_by must be 'image' or 'sequence', got {self.split_by!r}")
        values = (self.train_fraction, self.val_fraction, self.test_fraction)
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(
                "train_fraction, val_fraction and test_fraction must each be >= 0 and sum to 1, got "
                f"{values[0]} + {values[1]} + {values[2]} = {sum(values):g}"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.label_cache_dir is not None and Path(self.label_cache_dir).expanduser().is_file():
            raise ValueError(f"--label_cache_dir {self.label_cache_dir}: is a file, not a folder")

    @property
    def fractions(self) -> dict[str, float]:
        """The split fractions keyed by split name."""
        return {"train": self.train_fraction, "validation": self.val_fraction, "test": self.test_fraction}

    def source_kind(self) -> str:
        """Which layout the arguments name: 'pickle', 'hf', 'flat' or 'idd'."""
        folders = self.data_dir is not None or self.image_dir is not None or self.mask_dir is not None
        named = [n for n, given in (("--pickle_path", self.pickle_path), ("--dataset_name", self.dataset_name),
                                    ("--data_dir/--image_dir/--mask_dir", folders)) if given]
        if len(named) != 1:
            raise DataError(
                "give exactly one data source: --data_dir (IDD tree), --image_dir with --mask_dir (folders), "
                f"--dataset_name (Hub, save_to_disk or imagefolder) or --pickle_path; got {named or 'none'}"
            )
        if self.pickle_path is not None:
            return "pickle"
        if self.dataset_name is not None:
            return "hf"
        if self.image_dir is not None or self.mask_dir is not None:
            if self.image_dir is None or self.mask_dir is None:
                raise DataError("the folder layout needs both --image_dir and --mask_dir")
            return "flat"
        return "idd"

    def describe_source(self) -> str:
        """The folder, file or name the data comes from, for messages."""
        if self.pickle_path is not None:
            return self.pickle_path
        if self.dataset_name is not None:
            return self.dataset_name
        if self.image_dir is not None:
            return str(Path(self.data_dir or "") / self.image_dir)
        return str(self.data_dir)
