"""The legacy pickle: a restricted unpickler (numpy, PIL and plain containers only) and its split loader."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..labels import LabelSet
from ..parallel import chunked
from .arguments import SPLITS, DataSourceArguments
from .decoding import label_level, to_label_map, to_rgb_image
from .errors import DataError, EmptyDatasetError, UnsafePickleError
from .lazy_dataset import SampleDecoder
from .splits import split_indices, subsample
from .validation import VALIDATION_CHUNK, check_samples

if TYPE_CHECKING:
    import datasets

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


def load_pickle_splits(args: DataSourceArguments, label_set: LabelSet, seed: int) -> dict[str, datasets.Dataset]:
    """The pickle's samples split (seeded), validated and stored as npy bytes that `SampleDecoder` decodes."""
    import datasets
    source = args.pickle_path
    rows = load_legacy_pickle(source)
    if not rows:
        raise EmptyDatasetError(f"{source}: the pickle holds no samples")
    default_sequence = Path(source).stem
    keys = [str(row.get("path") or f"{Path(source).name}#{i:06d}") for i, row in enumerate(rows)]
    sequences = [str(row.get("sequence") or default_sequence) for row in rows]
    indices = split_indices(keys, sequences, args.fractions, seed, args.split_by)
    for salt, name in enumerate(SPLITS):
        keep = subsample(len(indices[name]), args.max_samples, seed, salt)
        if keep is not None:
            indices[name] = [indices[name][i] for i in keep]
    order = [i for name in SPLITS for i in indices[name]]
    tasks = ((rows[i].get("pixel_values"), rows[i].get("label"), keys[i]) for i in order)
    kept, good, _ = check_samples(
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
