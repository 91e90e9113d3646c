"""Finding samples in file layouts (an IDD tree, or image and mask folders) as `SampleRecord`s, decoding nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from ..labels import LabelSet, get_label_set
from .arguments import SPLIT_ALIASES, DataSourceArguments
from .decoding import label_level
from .errors import DataError, EmptyDatasetError
from .idd import IDD_POLYGON_SUFFIX, idd_frame_name, idd_label_suffix

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in sorted order, whatever the file system returns."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(folder) / name


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


def find_image_folder(image_dir: str | os.PathLike[str]) -> list[SampleRecord]:
    """Every image under a folder of images without masks, sorted by ``path`` (relative to the folder); the first
    sub-folder level is the sequence. For scoring by a model's predictions."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    records = []
    for image_path in _walk_images(root):
        relative = image_path.relative_to(root)
        sequence = relative.parts[0] if len(relative.parts) > 1 else root.name
        records.append(SampleRecord(str(image_path), None, sequence, None, relative.as_posix()))
    if not records:
        raise EmptyDatasetError(f"{root}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return records
