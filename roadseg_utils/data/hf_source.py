"""Hugging Face datasets as a source: loading a Hub, save_to_disk or imagefolder dataset and preparing its splits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers.utils import logging

from ..cli import one_line
from ..labels import LabelSet
from .arguments import ID2LABEL_FILE, LABEL_COLUMN_CANDIDATES, SPLIT_ALIASES, SPLITS, DataSourceArguments
from .decoding import label_level
from .errors import DataError, EmptyDatasetError, HubDatasetUnavailableError
from .lazy_dataset import SampleDecoder
from .splits import carving_fractions, split_dataset, subsample
from .validation import VALIDATION_CHUNK, check_labelled, check_samples

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)

_HUB_ERRORS = (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def shipped_id2label_file(args: DataSourceArguments) -> Path | None:
    """The id2label.json a Hugging Face dataset ships (in its folder, or in its Hub repository), or None."""
    name = args.dataset_name
    if name is None:
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        shipped = local / ID2LABEL_FILE
        return shipped if shipped.is_file() else None
    if local.exists() or _looks_like_local_path(name):
        return None
    try:
        return Path(hf_hub_download(name, ID2LABEL_FILE, repo_type="dataset"))
    except (*_HUB_ERRORS, EntryNotFoundError, ValueError) as err:
        # Most datasets ship no such file; and offline, loading the dataset itself reports the problem.
        logger.info(f"{name}: no {ID2LABEL_FILE} read from the Hub ({one_line(err)}), so the default label set is used")
        return None


def _label_column(dataset: datasets.Dataset, args: DataSourceArguments) -> str | None:
    """--label_column, else the first usual label column holding label maps (not class ids or numbers)."""
    import datasets
    if args.label_column is not None:
        return args.label_column if args.label_column in dataset.column_names else None
    for name in LABEL_COLUMN_CANDIDATES:
        if name in dataset.column_names and not isinstance(
            dataset.features[name], (datasets.ClassLabel, datasets.Value)
        ):
            return name
    return None


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
    label_column = _label_column(dataset, args)
    if label_column is None:
        wanted = (repr(args.label_column) if args.label_column
                  else "of label maps (looked for " + ", ".join(LABEL_COLUMN_CANDIDATES) + ")")
        if split != "train":
            logger.warning(f"{source}: no label column {wanted}, so the split is left out")
            return None
        raise DataError(f"{source}: no label column {wanted}; columns are {columns} (set --label_column)")
    if args.label_column is None and label_column != "label":
        logger.info(f"{source}: label maps read from column {label_column!r} (--label_column picks another)")
    if split != "train" and dataset.with_format("arrow")[label_column].null_count == len(dataset):
        logger.warning(f"{source}: every label is empty, so the split is left out")
        return None
    label_feature = dataset.features[label_column]
    if isinstance(label_feature, (datasets.ClassLabel, datasets.Value)):
        raise DataError(
            f"{source}: label column {label_column!r} holds {label_feature}, not segmentation maps "
            "(set --label_column to the mask column)"
        )
    extra = [c for c in ("path", "sequence") if c in columns and c not in (args.image_column, label_column)]
    dataset = dataset.select_columns([args.image_column, label_column, *extra])
    renames = {old: new for old, new in ((args.image_column, "image"), (label_column, "label")) if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    for column in ("image", "label"):
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image) and feature.decode:
            # `SampleDecoder` decodes the stored bytes itself, by the rules validation applied to them (EXIF
            # orientation, integrity, modes, lossless masks); a bad row then raises its BadSampleError, not a PIL
            # error from inside datasets. The table is not copied.
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return _with_path_and_sequence(dataset, split, args)


def _with_path_and_sequence(dataset: datasets.Dataset, split: str, args: DataSourceArguments) -> datasets.Dataset:
    """Add the contract's ``path`` (file path relative to the dataset, else split/index) and ``sequence`` columns."""
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


def load_hf_train_images(args: DataSourceArguments) -> datasets.Dataset:
    """The train split's images (undecoded) with ``path`` and ``sequence``, no label column needed: a pool that a
    model scores by its predictions."""
    import datasets
    train = _load_hf_source(args).get("train")
    if train is None:
        raise DataError(f"{args.dataset_name}: no train split to rank")
    source = f"{args.dataset_name} [train]"
    if args.image_column not in train.column_names:
        raise DataError(f"{source}: no image column {args.image_column!r}; columns are {train.column_names} "
                        "(set --image_column)")
    extra = [c for c in ("path", "sequence") if c in train.column_names and c != args.image_column]
    train = train.select_columns([args.image_column, *extra])
    if args.image_column != "image":
        train = train.rename_column(args.image_column, "image")
    if not isinstance(train.features["image"], datasets.Image):
        raise DataError(f"{source}: column {args.image_column!r} holds {train.features['image']}, not images")
    train = train.cast_column("image", datasets.Image(decode=False))
    return _with_path_and_sequence(train, "train", args)


def _hf_tasks(dataset: datasets.Dataset, chunk_size: int) -> Iterator[list[tuple[Any, Any, str]]]:
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), chunk_size):
        batch = table[start: start + chunk_size]
        yield list(zip(
            batch.column("image").to_pylist(), batch.column("label").to_pylist(), batch.column("path").to_pylist(),
            strict=True,
        ))


def load_hf_splits(args: DataSourceArguments, label_set: LabelSet, seed: int) -> dict[str, datasets.Dataset]:
    """A Hub, save_to_disk or imagefolder dataset's splits with contract columns, missing ones carved, validated."""
    import datasets
    prepared = {}
    for split, dataset in _load_hf_source(args).items():
        ready = _prepare_hf_split(dataset, split, args)
        if ready is not None:
            prepared[split] = ready
    carving = carving_fractions(prepared, args)
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
        keep = subsample(len(dataset), args.max_samples, seed, salt)
        if keep is not None:
            dataset = dataset.select(keep)
        kept, good, _ = check_samples(
            _hf_tasks(dataset, VALIDATION_CHUNK), len(dataset), label_set, args.on_bad_sample, args.num_workers
        )
        check_labelled([g.histogram for g in good], f"{args.dataset_name} [{name}]")
        # No height/width columns here: adding a column after select() would copy the whole table.
        if len(kept) < len(dataset):
            dataset = dataset.select(kept)
        splits[name] = dataset.with_transform(decoder)
    if not any(len(d) for d in splits.values()):
        raise EmptyDatasetError(f"{args.dataset_name}: no usable samples (none found, or all skipped as bad)")
    return splits
