"""Materialising the selected subset: a mirrored file tree, a saved Hugging Face dataset, a push to the Hub."""

from __future__ import annotations

import inspect
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import hub
from ..data import SampleRecord, idd_frame_name, label_level, paths_fingerprint, read_label_map
from ..labels import LabelSet
from .arguments import SelectionError
from .pool import CandidatePool

if TYPE_CHECKING:
    # Imported where used: `datasets` is slow to import
    # (`python -X importtime -c "import datasets"`), and file layouts never need it.
    import datasets

SUBSET_MARKER = ".roadseg_subset"


def check_materialize_target(target: str | os.PathLike[str]) -> None:
    """Raise `SelectionError` unless ``target`` is absent, empty, or an earlier subset (which it replaces)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / SUBSET_MARKER).exists())):
        raise SelectionError(
            f"{target}: exists and is not a subset written by run_selection.py; choose another --materialize_dir"
        )


def remove_stale_staging(target: str | os.PathLike[str]) -> None:
    """Remove the temporary folders a killed materialisation left beside ``target`` (call it holding the lock)."""
    target = Path(target)
    # tempfile.mkdtemp's names below: ".<target>.<8 characters>", with "old." or "cache." for the other two.
    pattern = re.compile(rf"\.{re.escape(target.name)}\.((old|cache)\.)?[a-z0-9_]{{8}}")
    if target.parent.is_dir():
        for entry in target.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)


def _claim_target(target: Path) -> Path:
    """A fresh temporary folder beside ``target``; refuses a ``target`` that holds anything but an earlier subset."""
    check_materialize_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _swap_into_place(staging: Path, target: Path) -> None:
    (staging / SUBSET_MARKER).write_text("written by run_selection.py; replaced on every --materialize\n")
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


def _record_root(record: SampleRecord) -> Path:
    """The data root a record's ``path`` is relative to."""
    image = Path(os.path.abspath(record.image_path))
    return Path(*image.parts[: len(image.parts) - len(Path(record.path).parts)])


def _files_of_record(record: SampleRecord, root: Path, listing: dict[Path, list[str]]) -> list[Path]:
    """The image and every annotation file of a record, absolute."""
    files = [Path(os.path.abspath(record.image_path))]
    if record.label_path is None:
        return files
    label = Path(os.path.abspath(record.label_path))
    name = Path(record.image_path).name
    stem = name.rsplit(".", 1)[0]
    frame = idd_frame_name(name)
    if frame != stem and label.name.startswith(f"{frame}_gtFine_"):
        # IDD: mirror every gtFine file of the frame (polygons and the label maps of all levels).
        folder = label.parent
        if folder not in listing:
            listing[folder] = sorted(os.listdir(folder)) if folder.is_dir() else []
        siblings = [folder / f for f in listing[folder] if f.startswith(f"{frame}_gtFine_")]
        files += siblings or [label]
    else:
        files.append(label)
    return files


def materialize_files(records: Sequence[SampleRecord], target: str | os.PathLike[str], mode: str) -> Path:
    """Mirror the records' images and annotations under ``target`` by symlink or copy, in their source layout.

    An IDD tree keeps ``leftImg8bit/<split>/<seq>/`` and every ``gtFine`` file of each frame; flat folders keep
    their image and mask folders relative to the data root. ``target`` is replaced as a whole.
    """
    if mode not in ("symlink", "copy"):
        raise SelectionError(f"materialize mode must be symlink or copy here, got {mode!r}")
    target = Path(target)
    staging = _claim_target(target)
    listing: dict[Path, list[str]] = {}
    try:
        for record in records:
            root = _record_root(record)
            for source in _files_of_record(record, root, listing):
                relative = Path(os.path.relpath(source, root))
                if relative.parts[0] == os.pardir:
                    raise SelectionError(
                        f"{source}: outside the data root {root}, so it cannot be mirrored; pass --data_dir as the "
                        "folder that holds both --image_dir and --mask_dir"
                    )
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                if mode == "symlink":
                    os.symlink(source, destination)
                else:
                    shutil.copy2(source, destination)
        _swap_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _png_bytes(label_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(label_map, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _record_rows(records: Sequence[SampleRecord], level: int | None) -> Iterator[dict[str, Any]]:
    for record in records:
        image_bytes = Path(record.image_path).read_bytes()
        label_path = record.label_path
        if label_path.lower().endswith(".png"):
            label_bytes = Path(label_path).read_bytes()
        else:
            label_bytes = _png_bytes(read_label_map(label_path, level))
        yield {
            "image": {"bytes": image_bytes, "path": Path(record.image_path).name},
            "label": {"bytes": label_bytes, "path": Path(label_path).with_suffix(".png").name},
            "path": record.path,
            "sequence": record.sequence,
        }


def _dataset_rows(dataset: datasets.Dataset, indices: Sequence[int]) -> Iterator[dict[str, Any]]:
    for index in indices:
        row = dataset[int(index)]
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        yield {
            "image": {"bytes": buffer.getvalue(), "path": None},
            "label": {"bytes": _png_bytes(row["label"]), "path": None},
            "path": row["path"],
            "sequence": row["sequence"],
        }


def _subset_dataset(
    pool: CandidatePool, indices: Sequence[int], label_set: LabelSet, cache_dir: str
) -> datasets.DatasetDict:
    """The chosen images as ``DatasetDict({"train": ...})`` (image and label PNG bytes, path, sequence) in
    ``cache_dir``, which must outlive the result."""
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(),
                                  "path": datasets.Value("string"), "sequence": datasets.Value("string")})
    if pool.records is not None:
        rows = _RowGenerator(_record_rows, [pool.records[i] for i in indices], label_level(label_set))
    else:
        rows = _RowGenerator(_dataset_rows, pool.dataset, list(indices))
    # datasets >= 4.3 takes the fingerprint as given; older versions hash the generator and its arguments instead.
    extra = {}
    if "fingerprint" in inspect.signature(datasets.Dataset.from_generator).parameters:
        extra["fingerprint"] = paths_fingerprint([pool.paths[i] for i in indices])
    subset = datasets.Dataset.from_generator(rows, features=features, cache_dir=cache_dir, **extra)
    return datasets.DatasetDict({"train": subset})


class _RowGenerator:
    """A generator factory with fixed arguments (from_generator calls it without any)."""

    def __init__(self, fn: Callable[..., Iterator[dict[str, Any]]], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __call__(self) -> Iterator[dict[str, Any]]:
        return self.fn(*self.args)


def materialize_dataset(
    pool: CandidatePool, indices: Sequence[int], label_set: LabelSet, target: str | os.PathLike[str]
) -> Path:
    """``save_to_disk`` the chosen images as a self-contained ``DatasetDict({"train": ...})`` in ``target``.

    Rows hold the image and label-map PNG bytes (file layouts embed their files' own bytes; polygon annotations
    are rasterised), ``path`` and ``sequence``; the data layer loads the folder back with ``--dataset_name``.
    An earlier subset in ``target`` is replaced as a whole.
    """
    target = Path(target)
    staging = _claim_target(target)
    cache = tempfile.mkdtemp(prefix=f".{target.name}.cache.", dir=target.parent)
    try:
        _subset_dataset(pool, indices, label_set, cache).save_to_disk(str(staging))
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging)
    return target


def push_subset_to_hub(saved_at: str | os.PathLike[str], repo_id: str, private: bool = False) -> str:
    """Publish a `materialize_dataset` folder as a Hub dataset; offline or refused access is one `SelectionError`."""
    import datasets
    saved_at = os.fspath(saved_at)
    unreachable = SelectionError(
        f"cannot reach the Hugging Face Hub to push {repo_id} (offline?); the subset is saved in {saved_at}: "
        f"push it later with datasets.load_from_disk({saved_at!r}).push_to_hub({repo_id!r})"
    )
    if not hub.hub_is_reachable():
        raise unreachable
    from huggingface_hub.errors import HfHubHTTPError

    try:
        datasets.load_from_disk(saved_at).push_to_hub(repo_id, private=private)
    except (HfHubHTTPError, ConnectionError, TimeoutError) as err:
        reason = hub.one_line(err)
        raise SelectionError(
            f"pushing {repo_id} to the Hub failed ({reason}); the subset is saved in {saved_at}"
        ) from err
    return f"https://huggingface.co/datasets/{repo_id}"
