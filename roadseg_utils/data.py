"""Finding, validating, loading and splitting segmentation datasets of every supported layout.

Every layout (IDD tree, image + mask folders, Hugging Face dataset, legacy pickle) ends as a
``datasets.DatasetDict`` with "train", "validation" and "test", whose rows follow DESIGN.md: ``image``
(PIL RGB), ``label`` (2-D uint8 array of label ids, 255 = ignore), ``path`` (a stable id: for file layouts
the image path relative to the dataset root), ``sequence``, and for file layouts and the pickle ``height`` and
``width``.

The Arrow tables hold only paths (or compact bytes for the pickle); a formatting transform
(`SampleDecoder`) decodes a row when it is read, so loading 8,000 IDD images decodes none of them.
Two consequences for callers:
- add a per-batch transform with ``with_sample_transform(dataset, fn)``, not ``dataset.set_transform(fn)``
  (which would replace the decoding, and ``fn`` would see path strings);
- read plain columns with ``dataset_column(dataset, "path")``: ``dataset["path"]`` runs the transform and so
  decodes every image.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from PIL import Image, ImageDraw
from transformers.utils import logging

from .cli import one_line
from .labels import IGNORE_INDEX, LabelSet, get_label_set, pixel_counts, raw_name_to_id
from .parallel import chunked, map_in_order, resolve_workers

if TYPE_CHECKING:
    # Imported where used: `datasets` takes ~0.6 s to import, and file layouts never need it.
    import datasets

logger = logging.get_logger(__name__)

GROUP_SUFFIX = "group"
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IDD_IMAGE_SUFFIX = "_leftImg8bit"
IDD_POLYGON_SUFFIX = "_gtFine_polygons.json"
NPY_MAGIC = b"\x93NUMPY"
VALIDATION_CHUNK = 16


class DataError(ValueError):
    """Bad data input; the message names the file or folder and the problem (scripts print it as one line)."""


class BadSampleError(DataError):
    """One sample cannot be used; ``path`` names its file and ``problem`` says why."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.problem)


class MissingMaskError(BadSampleError):
    """The image has no mask file."""


class UnreadableImageError(BadSampleError):
    """The image file is corrupt, truncated or not an image."""


class UnreadableMaskError(BadSampleError):
    """The mask exists but cannot be decoded into a 2-D map of label ids."""


class SizeMismatchError(BadSampleError):
    """Image and mask differ in size."""


class LabelValueError(BadSampleError):
    """The mask holds values outside the label set (other than 255 = ignore)."""


class EmptyDatasetError(DataError):
    """No usable sample was found (none present, or all skipped as bad)."""


class HubDatasetUnavailableError(DataError):
    """A Hub dataset could not be fetched (offline, wrong name, no access)."""


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy / PIL / plain-container allowlist."""


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
    label_column: str = field(default="label", metadata={"help": "Label-map column of a Hugging Face dataset."})
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
    label_set: str = field(
        default="idd-level3", metadata={"help": "idd-level1..idd-level4, or the path of an id2label JSON file."}
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


@dataclass(frozen=True)
class SampleRecord:
    """One image and its annotation (label-id PNG or IDD polygon JSON), located without decoding either.

    ``path`` is the sample's stable id, the dataset's ``path`` column: the image path relative to the dataset
    root (portable between machines); it defaults to ``image_path``.
    """

    image_path: str
    label_path: str | None
    sequence: str
    split: str | None
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            object.__setattr__(self, "path", self.image_path)


@dataclass(frozen=True, eq=False)
class ValidationResult:
    """The samples that passed validation, with what checking them measured."""

    records: list[SampleRecord]
    histograms: np.ndarray  # (len(records), 256) int64 pixel count of every label value
    sizes: list[tuple[int, int]]  # (height, width) per record
    skipped: list[tuple[str, str]]  # (file, problem) per skipped sample


# ---------------------------------------------------------------------------------------------------------
# Decoding images and label maps


def rasterize_polygons(annotation: dict[str, Any], level: int = 3, source: str = "<polygons>") -> np.ndarray:
    """Rasterise an IDD ``*_gtFine_polygons.json`` payload into a uint8 label map by the official rules."""
    name_to_id = raw_name_to_id(level)
    try:
        height, width = int(annotation["imgHeight"]), int(annotation["imgWidth"])
        objects = list(annotation.get("objects", []))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{source}: not an IDD polygon annotation ({err!r})") from err
    canvas = Image.new("L", (width, height), IGNORE_INDEX)
    drawer = ImageDraw.Draw(canvas)
    for index, obj in enumerate(objects):
        try:
            if obj.get("deleted"):
                continue
            raw_name = name = obj["label"]
            polygon = [(float(x), float(y)) for x, y in obj["polygon"]]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{source}: object {index} is malformed ({err!r})") from err
        if name not in name_to_id and name.endswith(GROUP_SUFFIX):
            name = name[: -len(GROUP_SUFFIX)]
        if name not in name_to_id:
            raise DataError(f"{source}: unknown IDD label name {raw_name!r}")
        if len(polygon) < 3:
            continue
        drawer.polygon(polygon, fill=name_to_id[name])
    return np.asarray(canvas, dtype=np.uint8)


def label_level(label_set: LabelSet | int | None) -> int | None:
    """The IDD level a label set is read at (``idd-level3`` -> 3); None for a custom label set; ints pass through."""
    return label_set if label_set is None or isinstance(label_set, int) else label_set.idd_level


def _label_array_from_array(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{source}: label map has shape {array.shape}; expected 2-D (height, width)")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind not in "iuf":
        raise DataError(f"{source}: label map has dtype {array.dtype}; expected integer label ids")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise DataError(f"{source}: label map holds non-integer values")
    if array.size and (array.min() < 0 or array.max() > IGNORE_INDEX):
        raise DataError(
            f"{source}: label values span {array.min()}..{array.max()}; label ids must fit 0-255 (255 = ignore)"
        )
    return array.astype(np.uint8)


def _label_array_from_pil(image: Image.Image, source: str) -> np.ndarray:
    # Palette ("P") masks store label ids as palette indices, so the indices are kept, never the colours.
    if image.mode in ("L", "P", "1"):
        return np.array(image, dtype=np.uint8)
    if image.mode.startswith("I"):
        return _label_array_from_array(np.array(image), source)
    raise DataError(f"{source}: mask has mode {image.mode}; expected a single-channel label-id image (L, P or I)")


def read_label_map(label_path: str | os.PathLike[str], level: LabelSet | int | None = 3) -> np.ndarray:
    """Decode a label-id image (mode L/P/I, values kept) or rasterise an IDD polygon JSON at ``level``."""
    path = os.fspath(label_path)
    if path.endswith(".json"):
        idd_level = label_level(level)
        if idd_level is None:
            raise DataError(f"{path}: polygon JSON needs an IDD label set (idd-level1..4), not a custom one")
        try:
            with open(path, encoding="utf-8") as handle:
                annotation = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        return rasterize_polygons(annotation, idd_level, source=path)
    with Image.open(path) as image:
        return _label_array_from_pil(image, path)


def _open_bytes_or_path(value: dict[str, Any]) -> Any:
    return value.get("bytes") or value.get("path")


def to_label_map(value: Any, level: LabelSet | int | None = 3, source: str = "<label>") -> np.ndarray:
    """Any stored label (path, PNG/npy bytes, PIL image, array, nested list) as a 2-D uint8 array."""
    if value is None:
        raise MissingMaskError(source, "has no mask")
    if isinstance(value, dict):
        return to_label_map(_open_bytes_or_path(value), level, source)
    if isinstance(value, (str, os.PathLike)):
        return read_label_map(value, level)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if data.startswith(NPY_MAGIC):
            return _label_array_from_array(np.load(io.BytesIO(data), allow_pickle=False), source)
        with Image.open(io.BytesIO(data)) as image:
            return _label_array_from_pil(image, source)
    if isinstance(value, Image.Image):
        return _label_array_from_pil(value, source)
    return _label_array_from_array(np.asarray(value), source)


def _image_array(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise DataError(f"{source}: image array has shape {array.shape}; expected (height, width, 3)")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise DataError(f"{source}: image array has dtype {array.dtype}; expected uint8 values 0-255")
        array = array.astype(np.uint8)
    return array


def to_rgb_image(value: Any, source: str = "<image>") -> Image.Image:
    """Any stored image (path, encoded or npy bytes, PIL image, array) as a loaded PIL RGB image."""
    if isinstance(value, dict):
        return to_rgb_image(_open_bytes_or_path(value), source)
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as image:
            return image.convert("RGB")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if data.startswith(NPY_MAGIC):
            return to_rgb_image(np.load(io.BytesIO(data), allow_pickle=False), source)
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    if value is None:
        raise DataError(f"{source}: has no image")
    return Image.fromarray(_image_array(np.asarray(value), source)).convert("RGB")


def _image_size(value: Any, source: str) -> tuple[int, int]:
    """(height, width) of a stored image, checking its integrity without decoding the pixels."""
    if isinstance(value, dict):
        return _image_size(_open_bytes_or_path(value), source)
    if isinstance(value, Image.Image):
        return value.height, value.width
    if isinstance(value, (bytes, bytearray, memoryview)) and bytes(value[:6]) == NPY_MAGIC:
        value = np.load(io.BytesIO(bytes(value)), allow_pickle=False)
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        handle = value if isinstance(value, (str, os.PathLike)) else io.BytesIO(bytes(value))
        with Image.open(handle) as image:
            width, height = image.size
            image.verify()
        return height, width
    if value is None:
        raise DataError(f"{source}: has no image")
    array = _image_array(np.asarray(value), source)
    return int(array.shape[0]), int(array.shape[1])


# ---------------------------------------------------------------------------------------------------------
# Finding samples in file layouts


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in sorted order, whatever the file system returns."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(folder) / name


def idd_frame_name(path: str | os.PathLike[str]) -> str:
    """The frame id of an image path: its file name without the extension and an IDD ``_leftImg8bit`` suffix."""
    stem = PurePosixPath(os.fspath(path).replace("\\", "/")).name.rsplit(".", 1)[0]
    return stem.removesuffix(IDD_IMAGE_SUFFIX)


def idd_label_suffix(level: int) -> str:
    """The file ending of an IDD label-id map at ``level``: ``_gtFine_labellevel<N>Ids.png``."""
    return f"_gtFine_labellevel{level}Ids.png"


def _find_idd_records(args: DataSourceArguments, label_set: LabelSet, include_unlabeled: bool) -> list[SampleRecord]:
    root = Path(args.data_dir)
    images_root = root / "leftImg8bit"
    if not images_root.is_dir():
        raise DataError(
            f"{root}: no leftImg8bit/ folder, so not an IDD tree; for other folders pass --image_dir and --mask_dir"
        )
    level = label_level(label_set)
    mask_suffix = args.mask_suffix
    if mask_suffix is None:
        if level is None:
            raise DataError(
                f"{root}: label set {label_set.name} is custom, so the IDD tree's masks cannot be named by level; "
                "pass --mask_suffix (e.g. _gtFine_labelCustomIds.png)"
            )
        mask_suffix = idd_label_suffix(level)
    records = []
    for split_dir in sorted(p for p in images_root.iterdir() if p.is_dir()):
        split = SPLIT_ALIASES.get(split_dir.name.lower())
        if split is None:
            logger.warning(f"{split_dir}: not a train/val/test folder; ignored")
            continue
        labels_root = root / "gtFine" / split_dir.name
        has_labels = labels_root.is_dir()
        unlabeled = 0
        for image_path in _walk_images(split_dir):
            relative = image_path.relative_to(split_dir)
            frame = idd_frame_name(image_path.name)
            png = labels_root / relative.parent / f"{frame}{mask_suffix}"
            polygons = labels_root / relative.parent / f"{frame}{IDD_POLYGON_SUFFIX}"
            if png.is_file():
                label: str | None = str(png)
            elif level is not None and polygons.is_file():
                label = str(polygons)
            elif has_labels:
                label = str(png)  # validation reports it as missing
            elif include_unlabeled:
                label = None
            else:
                unlabeled += 1
                continue
            sequence = relative.parts[0] if len(relative.parts) > 1 else split_dir.name
            records.append(
                SampleRecord(str(image_path), label, sequence, split, image_path.relative_to(root).as_posix())
            )
        if unlabeled:
            logger.warning(
                f"{split_dir}: {unlabeled} images left out: no gtFine/{split_dir.name} folder, so no annotations"
            )
    return records


def _find_flat_records(args: DataSourceArguments) -> list[SampleRecord]:
    base = Path(args.data_dir) if args.data_dir else None
    image_root = base / args.image_dir if base else Path(args.image_dir)
    mask_root = base / args.mask_dir if base else Path(args.mask_dir)
    for kind, folder in (("image", image_root), ("mask", mask_root)):
        if not folder.is_dir():
            raise DataError(f"{folder}: {kind} folder does not exist")
    key_root = base if base else image_root.parent
    mask_suffix = args.mask_suffix or ".png"
    shared_folder = image_root.resolve() == mask_root.resolve()
    records = []
    for image_path in _walk_images(image_root):
        name = image_path.name
        if shared_folder and name.endswith(mask_suffix):
            continue
        if args.image_suffix:
            if not name.endswith(args.image_suffix):
                continue
            stem = name[: -len(args.image_suffix)]
        else:
            stem = image_path.stem
        relative_dir = image_path.parent.relative_to(image_root)
        label = mask_root / relative_dir / f"{stem}{mask_suffix}"
        sequence = relative_dir.parts[0] if relative_dir.parts else image_root.name
        key = os.path.relpath(image_path, key_root).replace(os.sep, "/")
        records.append(SampleRecord(str(image_path), str(label), sequence, None, key))
    return records


def find_records(
    args: DataSourceArguments, label_set: LabelSet | None = None, include_unlabeled: bool = False
) -> list[SampleRecord]:
    """All samples of an IDD tree or image/mask folders, sorted by ``path``; no file is decoded.

    Images of a split without any gtFine folder (an IDD test set) are left out and logged, or kept with
    ``label_path=None`` when ``include_unlabeled`` (for prediction only).
    """
    label_set = label_set or get_label_set(args.label_set)
    kind = args.source_kind()
    if kind == "idd":
        records = _find_idd_records(args, label_set, include_unlabeled)
    elif kind == "flat":
        records = _find_flat_records(args)
    else:
        raise DataError(
            f"{args.describe_source()}: find_records reads file layouts (--data_dir, --image_dir/--mask_dir); "
            "use load_segmentation_dataset for Hugging Face datasets and pickles"
        )
    if not records:
        raise EmptyDatasetError(
            f"{args.describe_source()}: no annotated images found (expected leftImg8bit/<split>/<sequence>/"
            "<frame>_leftImg8bit.png|jpg with gtFine/, or images in --image_dir with masks in --mask_dir)"
        )
    return sorted(records, key=lambda r: r.path)


# ---------------------------------------------------------------------------------------------------------
# Splitting


def _normalised_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(fractions)}")
    total = sum(fractions.values())
    return {name: value / total for name, value in fractions.items()}


def _allocate_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder counts; every split with a positive fraction gets at least one item if there are enough."""
    exact = {name: share * total for name, share in fractions.items()}
    counts = {name: int(np.floor(value)) for name, value in exact.items()}
    by_remainder = sorted(fractions, key=lambda n: (-(exact[n] - counts[n]), list(fractions).index(n)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    positive = [n for n, share in fractions.items() if share > 0]
    if total >= len(positive):
        for name in positive:
            if counts[name] == 0:
                donor = max(positive, key=lambda n: counts[n])
                counts[donor] -= 1
                counts[name] = 1
    return counts


def _split_indices(
    keys: Sequence[str], groups: Sequence[str], fractions: Mapping[str, float], seed: int, split_by: str
) -> dict[str, list[int]]:
    """Seeded split of items into named parts; items are identified by ``keys`` so input order does not matter."""
    if split_by not in ("image", "sequence"):
        raise ValueError(f"split_by must be 'image' or 'sequence', got {split_by!r}")
    shares = _normalised_fractions(fractions)
    rng = np.random.default_rng(seed)
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    assigned: dict[str, list[int]] = {name: [] for name in shares}
    if split_by == "image":
        counts = _allocate_counts(len(order), shares)
        shuffled = [order[i] for i in rng.permutation(len(order))]
        start = 0
        for name in shares:
            assigned[name] = shuffled[start: start + counts[name]]
            start += counts[name]
    else:
        members: dict[str, list[int]] = defaultdict(list)
        for index in order:
            members[groups[index]].append(index)
        names = sorted(members)
        shuffled_groups = [names[i] for i in rng.permutation(len(names))]
        targets = {name: share * len(order) for name, share in shares.items()}
        positive = [n for n, share in shares.items() if share > 0]
        if len(names) < len(positive):
            logger.warning(f"only {len(names)} sequences for {len(positive)} splits: some splits stay empty")
        filled = dict.fromkeys(shares, 0)
        for position, group in enumerate(shuffled_groups):
            empty = [n for n in positive if filled[n] == 0]
            # Once only as many groups remain as splits still empty, each of those gets one.
            candidates = empty if len(shuffled_groups) - position <= len(empty) else positive
            name = max(candidates, key=lambda n: (targets[n] - filled[n], -positive.index(n)))
            assigned[name].extend(members[group])
            filled[name] += len(members[group])
    return {name: sorted(indices, key=lambda i: keys[i]) for name, indices in assigned.items()}


def split_records(
    records: Sequence[SampleRecord], fractions: Mapping[str, float], seed: int, split_by: str = "image"
) -> dict[str, list[SampleRecord]]:
    """Seeded split of records into ``fractions``' parts (renormalised), each sorted by ``path``.

    ``split_by="sequence"`` keeps every sequence whole, matching the fractions by image count as closely as
    whole sequences allow. The result depends only on the records, the fractions and the seed.
    """
    keys = [r.path for r in records]
    indices = _split_indices(keys, [r.sequence for r in records], fractions, seed, split_by)
    return {name: [records[i] for i in chosen] for name, chosen in indices.items()}


def dataset_column(dataset: datasets.Dataset, name: str) -> list[Any]:
    """A plain column of a dataset as a list, read from Arrow without running the decoding transform."""
    return dataset.with_format("arrow")[name].to_pylist()


def split_dataset(
    dataset: datasets.Dataset, fractions: Mapping[str, float], seed: int, split_by: str = "image"
) -> datasets.DatasetDict:
    """`split_records` for a dataset with ``path`` and ``sequence`` columns; formats carry over."""
    import datasets
    keys = dataset_column(dataset, "path")
    groups = dataset_column(dataset, "sequence") if split_by == "sequence" else keys
    indices = _split_indices(keys, groups, fractions, seed, split_by)
    return datasets.DatasetDict({name: dataset.select(chosen) for name, chosen in indices.items()})


def _carving_fractions(present: Iterable[str], args: DataSourceArguments) -> dict[str, float]:
    """Train plus every split that is missing, with their fractions (renormalised by the splitter)."""
    present = set(present)
    return {name: args.fractions[name] for name in SPLITS if name == "train" or name not in present}


def _subsample(count: int, max_samples: int | None, seed: int, salt: int) -> list[int] | None:
    if max_samples is None or count <= max_samples:
        return None
    return sorted(np.random.default_rng((seed, salt)).choice(count, max_samples, replace=False).tolist())


def assign_splits(
    records: Sequence[SampleRecord], args: DataSourceArguments, seed: int
) -> dict[str, list[SampleRecord]]:
    """Records per split: existing val/test folders as they are, missing splits carved from train.

    Each returned record's ``split`` is its final split; ``max_samples`` caps each split (seeded); every
    list is sorted by ``path``, so the order is stable for caching.
    """
    found: dict[str, list[SampleRecord]] = {name: [] for name in SPLITS}
    for record in records:
        found[record.split or "train"].append(record)
    present = [name for name in ("validation", "test") if found[name]]
    carving = _carving_fractions(present, args)
    if len(carving) > 1 and sum(carving.values()) > 0 and found["train"]:
        logger.info(f"carving {', '.join(n for n in carving if n != 'train')} from train ({args.split_by} split)")
        found.update(split_records(found["train"], carving, seed, args.split_by))
    result = {}
    for salt, name in enumerate(SPLITS):
        chosen = found[name]
        keep = _subsample(len(chosen), args.max_samples, seed, salt)
        if keep is not None:
            chosen = [chosen[i] for i in keep]
        result[name] = sorted((replace(r, split=name) for r in chosen), key=lambda r: r.path)
    return result


# ---------------------------------------------------------------------------------------------------------
# Validation


ON_BAD_SAMPLE_MODES = ("error", "skip")


class SampleVerdict(NamedTuple):
    """What checking one sample found: the error type and problem of a bad one, the size and histogram of a good one."""

    name: str
    error: type[BadSampleError] | None = None
    problem: str | None = None
    histogram: np.ndarray | None = None
    height: int = 0
    width: int = 0


def check_on_bad_sample(on_bad_sample: str) -> None:
    """Refuse an ``on_bad_sample`` policy other than ``error`` or ``skip``."""
    if on_bad_sample not in ON_BAD_SAMPLE_MODES:
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")


def label_value_problem(histogram: np.ndarray, label_set: LabelSet, mask: str = "mask") -> str | None:
    """The problem of a label histogram holding values outside ``label_set`` (255 is ignore), or None."""
    num_labels = label_set.num_labels
    invalid = np.flatnonzero(histogram[num_labels:IGNORE_INDEX]) + num_labels
    if not invalid.size:
        return None
    shown = ", ".join(str(v) for v in invalid[:10]) + (", ..." if invalid.size > 10 else "")
    return (f"{mask} holds label values {shown} outside {label_set.name} "
            f"(valid: 0-{num_labels - 1}, and {IGNORE_INDEX} = ignore)")


def sort_samples(
    verdicts: Iterable[SampleVerdict], on_bad_sample: str, source: str | None = None
) -> tuple[list[int], list[SampleVerdict], list[tuple[str, str]]]:
    """Indices and verdicts of the good samples, and (name, problem) of the skipped ones: the one bad-sample policy.

    ``error`` raises the first bad sample's `BadSampleError` subclass; ``skip`` logs each one and the total. With a
    ``source``, having skipped every sample raises `EmptyDatasetError` naming it.
    """
    check_on_bad_sample(on_bad_sample)
    kept: list[int] = []
    good: list[SampleVerdict] = []
    skipped: list[tuple[str, str]] = []
    count = 0
    for count, verdict in enumerate(verdicts, start=1):
        if verdict.error is None:
            kept.append(count - 1)
            good.append(verdict)
        elif on_bad_sample == "error":
            raise verdict.error(verdict.name, verdict.problem)
        else:
            logger.warning(f"skipping {verdict.name}: {verdict.problem}")
            skipped.append((verdict.name, verdict.problem))
    if skipped:
        if source is not None and not kept:
            raise EmptyDatasetError(f"{source}: all {count} samples were skipped as bad")
        logger.warning(f"skipped {len(skipped)} of {count} samples as bad (on_bad_sample=skip)")
    return kept, good, skipped


def _inspect_sample(image: Any, label: Any, name: str, label_set: LabelSet) -> SampleVerdict:
    try:
        height, width = _image_size(image, name)
    except Exception as err:  # any failure to read the image makes it unusable
        return SampleVerdict(name, UnreadableImageError, f"cannot read image ({err})")
    if label is None:
        return SampleVerdict(name, MissingMaskError, "has no mask")
    if isinstance(label, (str, os.PathLike)) and not os.path.isfile(label):
        return SampleVerdict(name, MissingMaskError, f"mask {os.fspath(label)} does not exist")
    try:
        label_map = to_label_map(label, label_set.idd_level, name)
    except Exception as err:  # any failure to decode the mask makes it unusable
        return SampleVerdict(name, UnreadableMaskError, f"cannot read mask ({err})")
    if label_map.shape != (height, width):
        mask_height, mask_width = label_map.shape
        return SampleVerdict(
            name, SizeMismatchError, f"mask is {mask_height}x{mask_width} but image is {height}x{width}"
        )
    histogram = pixel_counts(label_map)
    problem = label_value_problem(histogram, label_set)
    if problem is not None:
        return SampleVerdict(name, LabelValueError, problem)
    return SampleVerdict(name, histogram=histogram, height=height, width=width)


def _inspect_chunk(chunk: list[tuple[Any, Any, str]], label_set: LabelSet) -> list[SampleVerdict]:
    return [_inspect_sample(image, label, name, label_set) for image, label, name in chunk]


def _check_samples(
    chunks: Iterable[list[tuple[Any, Any, str]]],
    count: int,
    label_set: LabelSet,
    on_bad_sample: str,
    num_workers: int | None,
    source: str | None = None,
) -> tuple[list[int], list[SampleVerdict], list[tuple[str, str]]]:
    """`sort_samples` over every sample's inspection, run in worker processes when there are many."""
    check_on_bad_sample(on_bad_sample)
    inspect = functools.partial(_inspect_chunk, label_set=label_set)
    with closing(map_in_order(inspect, chunks, resolve_workers(num_workers, count))) as inspected_chunks:
        return sort_samples(itertools.chain.from_iterable(inspected_chunks), on_bad_sample, source)


def validate_records(
    records: Sequence[SampleRecord],
    label_set: LabelSet,
    on_bad_sample: str = "error",
    num_workers: int | None = None,
    source: str = "dataset",
) -> ValidationResult:
    """Check every sample (image integrity, mask present, sizes equal, values in the label set).

    ``error`` raises the first bad sample's `BadSampleError` subclass; ``skip`` logs each one and the total.
    No sample, or none left, raises `EmptyDatasetError` naming ``source``.
    """
    if not records:
        raise EmptyDatasetError(f"{source}: no samples to load")
    tasks = ((r.image_path, r.label_path, r.image_path) for r in records)
    kept, good, skipped = _check_samples(
        chunked(tasks, VALIDATION_CHUNK), len(records), label_set, on_bad_sample, num_workers, source
    )
    return ValidationResult(
        records=[records[i] for i in kept],
        histograms=np.stack([g.histogram for g in good]),
        sizes=[(g.height, g.width) for g in good],
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------------------
# The legacy pickle

_SAFE_GLOBALS = frozenset(
    [(module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(module, "scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("PIL.Image", "Image"), ("collections", "OrderedDict")]
    + [("builtins", name) for name in (
        "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex",
        "bool", "slice", "range",
    )]
    # Protocol 0-2 pickles spell bytes as _codecs.encode(text, "latin1"); it only encodes a string.
    + [("_codecs", "encode")]
)
_PY2_NAMES = {("__builtin__", "xrange"): ("builtins", "range")}
_PIL_PLUGIN = re.compile(r"PIL\.\w+ImagePlugin")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, PIL images and plain containers."""

    def __init__(self, handle: Any, source: str) -> None:
        super().__init__(handle)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = _PY2_NAMES.get((module, name), ("builtins" if module == "__builtin__" else module, name))
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if _PIL_PLUGIN.fullmatch(module) and name.endswith("ImageFile"):
            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, Image.Image):
                return found
        raise UnsafePickleError(
            f"{self._source}: refused to load global {module}.{name}; the legacy pickle may only hold numpy "
            "arrays, PIL images and plain containers"
        )


def load_legacy_pickle(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The seed's pickle (a list of dicts with ``pixel_values`` and ``label``), read through an allowlist."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            payload = _RestrictedUnpickler(handle, source).load()
    except UnsafePickleError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{source}: pickle file does not exist") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as err:
        raise DataError(f"{source}: not a readable pickle ({err})") from err
    if not isinstance(payload, (list, tuple)) or not all(isinstance(row, dict) for row in payload):
        raise DataError(
            f"{source}: expected a list of dicts with 'pixel_values' and 'label', got {type(payload).__name__}"
        )
    return list(payload)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_pickle_splits(args: DataSourceArguments, label_set: LabelSet, seed: int) -> dict[str, datasets.Dataset]:
    import datasets
    source = args.pickle_path
    rows = load_legacy_pickle(source)
    if not rows:
        raise EmptyDatasetError(f"{source}: the pickle holds no samples")
    default_sequence = Path(source).stem
    keys = [str(row.get("path") or f"{Path(source).name}#{i:06d}") for i, row in enumerate(rows)]
    sequences = [str(row.get("sequence") or default_sequence) for row in rows]
    indices = _split_indices(keys, sequences, args.fractions, seed, args.split_by)
    for salt, name in enumerate(SPLITS):
        keep = _subsample(len(indices[name]), args.max_samples, seed, salt)
        if keep is not None:
            indices[name] = [indices[name][i] for i in keep]
    order = [i for name in SPLITS for i in indices[name]]
    tasks = ((rows[i].get("pixel_values"), rows[i].get("label"), keys[i]) for i in order)
    kept, good, _ = _check_samples(
        chunked(tasks, VALIDATION_CHUNK), len(order), label_set, args.on_bad_sample, 1, source
    )
    inspected = {order[k]: g for k, g in zip(kept, good, strict=True)}
    features = datasets.Features({
        "image": datasets.Value("binary"), "label": datasets.Value("binary"), "path": datasets.Value("string"),
        "sequence": datasets.Value("string"), "height": datasets.Value("int32"), "width": datasets.Value("int32"),
    })
    decoder = SampleDecoder(label_level(label_set))
    splits = {}
    for name in SPLITS:
        chosen = [i for i in indices[name] if i in inspected]
        # Raw npy bytes keep the pickle's exact pixels and cost no image encoding.
        columns = {
            "image": [_npy_bytes(np.asarray(to_rgb_image(rows[i]["pixel_values"], keys[i]))) for i in chosen],
            "label": [_npy_bytes(to_label_map(rows[i]["label"], None, keys[i])) for i in chosen],
            "path": [keys[i] for i in chosen],
            "sequence": [sequences[i] for i in chosen],
            "height": [inspected[i].height for i in chosen],
            "width": [inspected[i].width for i in chosen],
        }
        splits[name] = datasets.Dataset.from_dict(columns, features=features).with_transform(decoder)
    return splits


# ---------------------------------------------------------------------------------------------------------
# Datasets


def _row_name(names: Sequence[Any] | None, index: int) -> str:
    return str(names[index]) if names is not None else f"row {index}"


class SampleDecoder:
    """Formatting transform that turns stored rows into contract rows (image: PIL RGB, label: uint8 2-D array).

    Columns missing from a batch are left alone, so ``select_columns(["path"])`` decodes nothing; a row
    without a mask (prediction-only data) gets ``label=None``.
    """

    def __init__(self, label_level: int | None = 3) -> None:
        self.label_level = label_level

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        decoded = dict(batch)
        names = batch.get("path")
        if "image" in batch:
            decoded["image"] = [to_rgb_image(v, _row_name(names, i)) for i, v in enumerate(batch["image"])]
        if "label" in batch:
            decoded["label"] = [
                None if v is None else to_label_map(v, self.label_level, _row_name(names, i))
                for i, v in enumerate(batch["label"])
            ]
        return decoded


class _ChainedTransform:
    """Decoding followed by a caller's batch transform (picklable for data-loader workers)."""

    def __init__(self, decoder: Callable[[dict], dict] | None, transform: Callable[[dict], dict]) -> None:
        self.decoder = decoder
        self.transform = transform

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return self.transform(self.decoder(batch) if self.decoder is not None else batch)


def with_sample_transform(
    dataset: datasets.Dataset, transform: Callable[[dict[str, list[Any]]], dict[str, list[Any]]] | None
) -> datasets.Dataset:
    """The dataset with ``transform`` applied to decoded batches (replacing an earlier one; None removes it)."""
    current = dataset.format["format_kwargs"].get("transform") if dataset.format["type"] == "custom" else None
    decoder = current.decoder if isinstance(current, _ChainedTransform) else current
    if transform is None:
        return dataset.with_transform(decoder) if decoder is not None else dataset.with_format(None)
    return dataset.with_transform(_ChainedTransform(decoder, transform))


def records_to_dataset(
    records: Sequence[SampleRecord], label_set: LabelSet | int | None, sizes: Sequence[tuple[int, int]] | None = None
) -> datasets.Dataset:
    """A lazily decoded dataset of records: the table holds paths, `SampleDecoder` reads files on access."""
    import datasets
    columns: dict[str, list[Any]] = {
        "image": [r.image_path for r in records],
        "label": [r.label_path for r in records],
        "path": [r.path for r in records],
        "sequence": [r.sequence for r in records],
    }
    features = {name: datasets.Value("string") for name in columns}
    if sizes is not None:
        columns["height"] = [h for h, _ in sizes]
        columns["width"] = [w for _, w in sizes]
        features.update(height=datasets.Value("int32"), width=datasets.Value("int32"))
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return dataset.with_transform(SampleDecoder(label_level(label_set)))


def load_split_records(
    args: DataSourceArguments, label_set: LabelSet | None = None, seed: int = 0
) -> dict[str, ValidationResult]:
    """File layouts: the validated records of each split with their label histograms and sizes.

    This is the record level under `load_segmentation_dataset` (same splits for the same arguments and seed),
    for callers that want the histograms, e.g. class statistics, without decoding any mask again;
    ``records_to_dataset(result.records, label_set, result.sizes)`` turns one split into its dataset.
    """
    label_set = label_set or get_label_set(args.label_set)
    splits = assign_splits(find_records(args, label_set), args, seed)
    ordered = [r for name in SPLITS for r in splits[name]]
    result = validate_records(ordered, label_set, args.on_bad_sample, args.num_workers, args.describe_source())
    split_of_image = {r.image_path: r.split for r in ordered}
    positions: dict[str, list[int]] = {name: [] for name in SPLITS}
    for position, record in enumerate(result.records):
        positions[record.split].append(position)
    return {
        name: ValidationResult(
            records=[result.records[i] for i in chosen],
            histograms=result.histograms[chosen],
            sizes=[result.sizes[i] for i in chosen],
            skipped=[(file, problem) for file, problem in result.skipped if split_of_image[file] == name],
        )
        for name, chosen in positions.items()
    }


def _load_file_splits(args: DataSourceArguments, label_set: LabelSet, seed: int) -> dict[str, datasets.Dataset]:
    validated = load_split_records(args, label_set, seed)
    return {name: records_to_dataset(part.records, label_set, part.sizes) for name, part in validated.items()}


_HUB_ERRORS = (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _load_hf_source(args: DataSourceArguments) -> dict[str, datasets.Dataset]:
    import datasets
    name = args.dataset_name
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        else:
            try:
                loaded = datasets.load_dataset(str(local), args.dataset_config_name)
            except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as err:
                raise DataError(f"{name}: cannot load this folder as a dataset ({err})") from err
    elif local.exists() or _looks_like_local_path(name):
        raise DataError(f"{name}: not a dataset folder (expected a save_to_disk folder or an imagefolder directory)")
    else:
        try:
            loaded = datasets.load_dataset(name, args.dataset_config_name)
        except (*_HUB_ERRORS, datasets.exceptions.DatasetNotFoundError) as err:
            reason = one_line(err)
            raise HubDatasetUnavailableError(
                f"cannot load dataset {name!r} from the Hugging Face Hub ({reason}); offline or no access? "
                "Pass a local copy: a save_to_disk folder or an imagefolder directory as --dataset_name, "
                "or an IDD tree as --data_dir"
            ) from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    splits = {}
    for split_name, dataset in loaded.items():
        canonical = SPLIT_ALIASES.get(split_name.lower())
        if canonical is None or canonical in splits:
            logger.warning(f"{name}: split {split_name!r} is not used (only train, validation and test are)")
            continue
        splits[canonical] = dataset
    return splits


def _hf_image_files(dataset: datasets.Dataset) -> list[str | None]:
    """The file path stored with each image, read from Arrow without decoding; None where there is none."""
    column = dataset.with_format("arrow")["image"]
    if not isinstance(column.type, pa.StructType) or "path" not in {f.name for f in column.type}:
        return [None] * len(dataset)
    return column.combine_chunks().field("path").to_pylist()


def _prepare_hf_split(
    dataset: datasets.Dataset, split: str, args: DataSourceArguments
) -> datasets.Dataset | None:
    """The split with contract columns image, label, path, sequence; None for an unlabelled eval split."""
    import datasets
    source = f"{args.dataset_name} [{split}]"
    columns = dataset.column_names
    if args.image_column not in columns:
        raise DataError(f"{source}: no image column {args.image_column!r}; columns are {columns} (set --image_column)")
    if args.label_column not in columns:
        if split != "train":
            logger.warning(f"{source}: no label column {args.label_column!r}, so the split is left out")
            return None
        raise DataError(f"{source}: no label column {args.label_column!r}; columns are {columns} (set --label_column)")
    if split != "train" and dataset.with_format("arrow")[args.label_column].null_count == len(dataset):
        logger.warning(f"{source}: every label is empty, so the split is left out")
        return None
    label_feature = dataset.features[args.label_column]
    if isinstance(label_feature, (datasets.ClassLabel, datasets.Value)):
        raise DataError(
            f"{source}: label column {args.label_column!r} holds {label_feature}, not segmentation maps "
            "(set --label_column to the mask column)"
        )
    extra = [c for c in ("path", "sequence") if c in columns and c not in (args.image_column, args.label_column)]
    dataset = dataset.select_columns([args.image_column, args.label_column, *extra])
    renames = {old: new for old, new in ((args.image_column, "image"), (args.label_column, "label")) if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    files = _hf_image_files(dataset)
    root = Path(args.dataset_name).expanduser()
    if "path" not in dataset.column_names:
        keys = [
            os.path.relpath(f, root).replace(os.sep, "/") if f and root.is_dir() and os.path.isabs(f) else f
            for f in files
        ]
        if None in keys or "" in keys or len(set(keys)) != len(keys):
            keys = [f"{split}/{i:06d}" for i in range(len(dataset))]
        dataset = dataset.add_column("path", keys)
    if "sequence" not in dataset.column_names:
        default = root.name or args.dataset_name
        sequences = [PurePosixPath(f.replace(os.sep, "/")).parent.name or default if f else default for f in files]
        dataset = dataset.add_column("sequence", sequences)
    return dataset


def _hf_tasks(dataset: datasets.Dataset, chunk_size: int) -> Iterator[list[tuple[Any, Any, str]]]:
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), chunk_size):
        batch = table[start: start + chunk_size]
        yield list(zip(
            batch.column("image").to_pylist(), batch.column("label").to_pylist(), batch.column("path").to_pylist(),
            strict=True,
        ))


def _load_hf_splits(args: DataSourceArguments, label_set: LabelSet, seed: int) -> dict[str, datasets.Dataset]:
    import datasets
    prepared = {}
    for split, dataset in _load_hf_source(args).items():
        ready = _prepare_hf_split(dataset, split, args)
        if ready is not None:
            prepared[split] = ready
    carving = _carving_fractions(prepared, args)
    if len(carving) > 1 and sum(carving.values()) > 0 and "train" in prepared:
        prepared.update(split_dataset(prepared["train"], carving, seed, args.split_by))
    decoder = SampleDecoder(label_level(label_set))
    splits: dict[str, datasets.Dataset] = {}
    for salt, name in enumerate(SPLITS):
        dataset = prepared.get(name)
        if dataset is None:
            empty_columns = ("image", "label", "path", "sequence")
            dataset = datasets.Dataset.from_dict(
                {c: [] for c in empty_columns},
                features=datasets.Features({c: datasets.Value("string") for c in empty_columns}),
            )
        keep = _subsample(len(dataset), args.max_samples, seed, salt)
        if keep is not None:
            dataset = dataset.select(keep)
        kept, _, _ = _check_samples(
            _hf_tasks(dataset, VALIDATION_CHUNK), len(dataset), label_set, args.on_bad_sample, args.num_workers
        )
        # No height/width columns here: adding a column after select() would copy the whole table.
        if len(kept) < len(dataset):
            dataset = dataset.select(kept)
        splits[name] = dataset.with_transform(decoder)
    if not any(len(d) for d in splits.values()):
        raise EmptyDatasetError(f"{args.dataset_name}: no usable samples (none found, or all skipped as bad)")
    return splits


def load_segmentation_dataset(
    args: DataSourceArguments, label_set: LabelSet | None = None, seed: int = 0
) -> datasets.DatasetDict:
    """Load any supported layout as "train"/"validation"/"test" with the DESIGN.md row contract, validated.

    Existing val/test splits are used as they are; missing ones are carved from train (``args`` fractions,
    ``split_by``, ``seed``). Rows decode lazily; see the module docstring for adding transforms.
    """
    import datasets
    label_set = label_set or get_label_set(args.label_set)
    kind = args.source_kind()
    if kind == "pickle":
        splits = _load_pickle_splits(args, label_set, seed)
    elif kind == "hf":
        splits = _load_hf_splits(args, label_set, seed)
    else:
        splits = _load_file_splits(args, label_set, seed)
    logger.info(
        f"loaded {args.describe_source()}: " + ", ".join(f"{name} {len(splits[name])}" for name in SPLITS) + " images"
    )
    return datasets.DatasetDict({name: splits[name] for name in SPLITS})


def paths_fingerprint(paths: Iterable[str]) -> str:
    """A short hash of a set of sample ids, e.g. to tie a selection manifest or a cache to its dataset."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode("utf-8"))
    return digest.hexdigest()[:16]
