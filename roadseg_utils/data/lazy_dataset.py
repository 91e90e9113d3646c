"""Lazily decoded datasets: the table holds paths or bytes, and `SampleDecoder` decodes a row when it is read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..labels import LabelSet
from .decoding import label_level, to_label_map, to_rgb_image

if TYPE_CHECKING:
    import datasets

    from .layouts import SampleRecord


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


def dataset_column(dataset: datasets.Dataset, name: str) -> list[Any]:
    """A plain column of a dataset as a list, read from Arrow without running the decoding transform."""
    return dataset.with_format("arrow")[name].to_pylist()
