"""The legacy pickle: a restricted unpickler and its split loader.

The unpickler admits only what rebuilds numpy arrays, PIL images (from their pixel bytes) and plain containers in
memory: no global it hands out opens a path, runs a command, or allocates more than its data (PIL's file classes
are replaced by an in-memory image class; `numpy`'s and PIL's rebuilders are checked). Anything else raises
`UnsafePickleError` naming the pickle.
"""

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
from .image_files import check_regular_file
from .lazy_dataset import SampleDecoder
from .splits import split_indices, subsample
from .validation import VALIDATION_CHUNK, check_labelled, check_samples

if TYPE_CHECKING:
    import datasets

_SAFE_GLOBALS = frozenset(
    [(module, "scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")]
    + [("builtins", name) for name in (
        "dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "complex", "bool", "slice", "range",
    )]
)
_PY2_NAMES = {
    ("__builtin__", "xrange"): ("builtins", "range"), ("copy_reg", "_reconstructor"): ("copyreg", "_reconstructor"),
}
_PIL_IMAGE_CLASS = re.compile(r"PIL\.Image\.Image|PIL\.\w+ImagePlugin\.\w*ImageFile")


class _RefusedPickle(Exception):
    """A pickle asked an admitted global for more than rebuilding in-memory data (the loader names the pickle)."""


class _PickledImage(Image.Image):
    """What every pickled PIL image class is rebuilt as: an in-memory image from its pixel bytes.

    PIL's file classes (``PngImageFile``, ...) open a path when called, so a pickle could read any local file, or
    block on a FIFO or ``/dev/stdin``; this class may only be created empty (as pickle does) and filled by
    ``__setstate__``, which refuses an image over PIL's decompression-bomb limit before allocating it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _RefusedPickle("a PIL image class was called; only images rebuilt from their pixel bytes are admitted")

    def __setstate__(self, state: Any) -> None:
        size = state[2] if isinstance(state, (list, tuple)) and len(state) >= 5 else None
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise _RefusedPickle("a PIL image's state is not (info, mode, size, palette, pixel bytes)")
        if min(size) < 0 or size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or 2**62):
            raise _RefusedPickle(f"a PIL image of {size[0]}x{size[1]} pixels is over the decompression-bomb limit")
        if not isinstance(state[4], (bytes, bytearray)):
            raise _RefusedPickle("a PIL image's pixels are not bytes")
        super().__setstate__(list(state))


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1 spelling of a pickled object (``copyreg._reconstructor``), admitted for PIL images only."""
    if cls is not _PickledImage or base is not object or state is not None:
        raise _RefusedPickle("copyreg._reconstructor may only rebuild a PIL image")
    return object.__new__(cls)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 0-2 spelling of bytes (``_codecs.encode(text, "latin1")``); other codecs are refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedPickle(f"_codecs.encode may only spell bytes in latin1, not {encoding!r}")
    return text.encode("latin1")


def _buffer(kind: type) -> Any:
    """``bytes`` / ``bytearray`` that only copy data: an integer would allocate that many bytes."""
    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], (bytes, bytearray, str)):
            raise _RefusedPickle(f"{kind.__name__}() may only copy data in a pickle")
        return kind(*args)
    return build


def _reconstruct_array(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` (an empty array that ``__setstate__`` fills), refusing a pre-sized allocation."""
    if shape != (0,):
        raise _RefusedPickle(f"numpy _reconstruct asked for shape {shape!r}; pickled arrays start empty")
    return np.ndarray.__new__(subtype, shape, dtype)


_WRAPPED = {
    **{(module, "_reconstruct"): _reconstruct_array for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytes"): _buffer(bytes),
    ("builtins", "bytearray"): _buffer(bytearray),
    ("builtins", "object"): object,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, PIL images from pixel bytes and plain containers; nothing opens
    a file or runs a command (every admitted global only builds data in memory)."""

    def __init__(self, handle: Any, source: str) -> None:
        super().__init__(handle)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = _PY2_NAMES.get((module, name), ("builtins" if module == "__builtin__" else module, name))
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _WRAPPED:
            return _WRAPPED[module, name]
        if _PIL_IMAGE_CLASS.fullmatch(f"{module}.{name}"):
            return _PickledImage
        raise UnsafePickleError(
            f"{self._source}: refused to load global {module}.{name}; the legacy pickle may only hold numpy "
            "arrays, PIL images and plain containers"
        )


def load_legacy_pickle(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The seed's pickle (a list of dicts with ``pixel_values`` and ``label``), read through an allowlist."""
    source = os.fspath(path)
    # A FIFO or device would block the reader, so only a regular file is opened.
    check_regular_file(source, lambda problem: DataError(f"{source}: pickle {problem}"))
    try:
        with open(source, "rb") as handle:
            payload = _RestrictedUnpickler(handle, source).load()
    except UnsafePickleError:
        raise
    except _RefusedPickle as err:
        raise UnsafePickleError(f"{source}: refused: {err}") from None
    except OSError as err:
        raise DataError(f"{source}: cannot read the pickle ({err.strerror or err})") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            KeyError, MemoryError, RecursionError) as err:
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
        check_labelled([inspected[i].histogram for i in chosen], f"{source} [{name}]")
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
