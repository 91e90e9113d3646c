"""Lazily decoded datasets: the table holds paths or bytes, `SampleDecoder` decodes a row when it is read, and
`BadSampleGuard` applies the one bad-sample policy to a row that turns out bad then (e.g. in a DataLoader worker)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from ..labels import LabelSet
from .decoding import label_level, to_label_map, to_rgb_image
from .errors import (
    BadSampleError,
    EmptyDatasetError,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    reason,
)
from .validation import check_on_bad_sample

if TYPE_CHECKING:
    import datasets

    from .layouts import SampleRecord


logger = logging.get_logger(__name__)


def _row_name(batch: dict[str, list[Any]], index: int) -> str:
    """The row's image file where the table holds one (as validation names it), else its ``path`` id."""
    image = batch["image"][index] if "image" in batch else None
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    names = batch.get("path")
    return str(names[index]) if names is not None else f"row {index}"


def _file_name(value: Any) -> str:
    """The file a stored value was read from, for messages ("" when it is in memory)."""
    if isinstance(value, dict):
        value = value.get("path")
    return f" {os.fspath(value)}" if isinstance(value, (str, os.PathLike)) and value else ""


class SampleDecoder:
    """Formatting transform that turns stored rows into contract rows (image: PIL RGB, label: uint8 2-D array).

    Columns missing from a batch are left alone, so ``select_columns(["path"])`` decodes nothing; a row
    without a mask (prediction-only data) gets ``label=None``. A row that cannot be decoded raises the
    `BadSampleError` subclass naming it (`UnreadableImageError`, `UnreadableMaskError`, `SizeMismatchError`).
    """

    def __init__(self, label_level: int | None = 3) -> None:
        self.label_level = label_level

    def _image(self, value: Any, name: str) -> Any:
        try:
            return to_rgb_image(value, name)
        except (BadSampleError, MemoryError, RecursionError):
            raise
        except Exception as err:  # any other failure to decode makes the sample unusable
            raise UnreadableImageError(name, f"cannot read image{_file_name(value)} ({reason(err)})") from err

    def _label(self, value: Any, name: str) -> Any:
        if value is None:
            return None
        try:
            return to_label_map(value, self.label_level, name)
        except (MemoryError, RecursionError):
            raise
        except Exception as err:  # any failure to decode makes the sample unusable
            if isinstance(err, BadSampleError) and err.path == name:
                raise
            # Named by the row, the mask file inside the problem: as validation reports it.
            raise UnreadableMaskError(name, f"cannot read mask ({reason(err)})") from err

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        decoded = dict(batch)
        names = [_row_name(batch, i) for i in range(len(next(iter(batch.values()), [])))]
        if "image" in batch:
            decoded["image"] = [self._image(v, names[i]) for i, v in enumerate(batch["image"])]
        if "label" in batch:
            decoded["label"] = [self._label(v, names[i]) for i, v in enumerate(batch["label"])]
        if "image" in batch and "label" in batch:
            for name, image, label in zip(names, decoded["image"], decoded["label"], strict=True):
                # A file replaced since validation would otherwise fail later inside a transform.
                if label is not None and label.shape != (image.height, image.width):
                    raise SizeMismatchError(
                        name, f"mask is {label.shape[0]}x{label.shape[1]} but image is {image.height}x{image.width}"
                    )
        return decoded


class BadSampleGuard:
    """A map-style dataset around one whose rows may raise `BadSampleError`, applying ``on_bad_sample`` to them.

    ``error`` re-raises; ``skip`` logs ``skipping <path>: <problem>`` once per sample and process and returns the
    next good row in index order (wrapping around; `EmptyDatasetError` when none is good) with ``substitute``
    (training: every batch stays full and deterministic), or None without it (evaluation: the caller drops it).
    Picklable, so DataLoader workers each get a copy.
    """

    def __init__(self, dataset: Any, on_bad_sample: str, substitute: bool = True, source: str = "dataset") -> None:
        check_on_bad_sample(on_bad_sample)
        self.dataset = dataset
        self.on_bad_sample = on_bad_sample
        self.substitute = substitute
        self.source = source
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> Any:
        """The row, or None when it is bad (logged the first time) in skip mode."""
        if index in self._bad:
            return None
        try:
            return self.dataset[index]
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise
            self._bad.add(index)
            logger.warning(f"skipping {err.path}: {err.problem}")
            return None

    def __getitem__(self, index: int) -> Any:
        count = len(self.dataset)
        index = int(index)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} samples")
        index %= count
        row = self._read(index)
        if row is not None or not self.substitute:
            return row
        for step in range(1, count):
            row = self._read((index + step) % count)
            if row is not None:
                return row
        raise EmptyDatasetError(f"{self.source}: all {count} samples are bad (on_bad_sample=skip)")


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


def dataset_column(dataset: datasets.Dataset, name: str) -> list[Any]:
    """A plain column of a dataset as a list, read from Arrow without running the decoding transform."""
    return dataset.with_format("arrow")[name].to_pylist()
