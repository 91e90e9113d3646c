"""Decoding any stored image or label (path, bytes, PIL image, array) into a PIL RGB image or a uint8 label map."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from ..labels import IGNORE_INDEX, LabelSet
from .errors import DataError, MissingMaskError
from .idd import rasterize_polygons

NPY_MAGIC = b"\x93NUMPY"


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


def image_size(value: Any, source: str) -> tuple[int, int]:
    """(height, width) of a stored image, checking its integrity without decoding the pixels."""
    if isinstance(value, dict):
        return image_size(_open_bytes_or_path(value), source)
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
