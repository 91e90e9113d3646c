"""Decoding any stored image or label (path, bytes, PIL image, array) into a PIL RGB image or a uint8 label map.

Files and encoded bytes are opened by `image_files` (regular files only, no decompression bombs, EXIF orientation
applied, integrity checked from headers and trailers). What is refused rather than decoded into a wrong result:
- images: float (``F``) and other modes without a faithful RGB conversion. 16-bit greyscale (``I;16``, ``I;16B``,
  ...) is scaled to 8 bits (value >> 8) instead of being clipped to white; a 32-bit ``I`` image holding only 0-255
  is taken as 8-bit, one holding up to 65535 as 16-bit, anything else is refused;
- masks: lossy formats (JPEG, lossy WebP), whose compression invents label values along every edge; store masks
  as PNG. Palette masks keep their indices, 16-bit masks their values (label ids must fit 0-255).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..labels import IGNORE_INDEX, LabelSet
from .errors import DataError, MissingMaskError, UnreadableImageError, UnreadableMaskError
from .idd import rasterize_polygons
from .image_files import check_integrity, check_regular_file, decode_upright, open_stored_image, upright_size

NPY_MAGIC = b"\x93NUMPY"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes PIL converts to RGB faithfully; anything else (e.g. F, 32-bit float) is refused.
_CONVERTIBLE = ("RGB", "1", "L", "P", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV", "I",
                *_SIXTEEN_BIT)


def label_level(label_set: LabelSet | int | None) -> int | None:
    """The IDD level a label set is read at (``idd-level3`` -> 3); None for a custom label set; ints pass through."""
    return label_set if label_set is None or isinstance(label_set, int) else label_set.idd_level


def _image_problem(source: str) -> Callable[[str], Exception]:
    return lambda detail: UnreadableImageError(source, f"cannot read image ({detail})")


def _mask_problem(source: str) -> Callable[[str], Exception]:
    return lambda detail: UnreadableMaskError(source, detail)


def _label_array_from_array(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise UnreadableMaskError(source, f"label map has shape {array.shape}; expected 2-D (height, width)")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind not in "iuf":
        raise UnreadableMaskError(source, f"label map has dtype {array.dtype}; expected integer label ids")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UnreadableMaskError(source, "label map holds non-integer values")
    if array.size and (array.min() < 0 or array.max() > IGNORE_INDEX):
        raise UnreadableMaskError(
            source, f"label values span {array.min()}..{array.max()}; label ids must fit 0-255 (255 = ignore)"
        )
    return array.astype(np.uint8)


def _is_lossy(image: Image.Image) -> bool:
    """Whether an opened image is stored lossily: a JPEG, or a WebP whose image chunk is ``VP8 `` (not ``VP8L``)."""
    if image.format in ("JPEG", "MPO"):
        return True
    if image.format != "WEBP" or getattr(image, "fp", None) is None:
        return False
    handle = image.fp
    position = handle.tell()
    try:
        handle.seek(12)
        while len(header := handle.read(8)) == 8:
            kind, size = header[:4], int.from_bytes(header[4:], "little")
            if kind in (b"VP8 ", b"VP8L"):
                return kind == b"VP8 "
            handle.seek(size + (size & 1), os.SEEK_CUR)
        return False
    finally:
        handle.seek(position)


def _decoded_mask(image: Image.Image, source: str) -> np.ndarray:
    """A mask opened from a file or bytes: lossy formats refused, then decoded upright."""
    if _is_lossy(image):
        raise UnreadableMaskError(
            source, f"mask is stored as {image.format}, a lossy format whose compression invents label values; "
            "store masks as PNG"
        )
    return _label_array_from_pil(decode_upright(image, _mask_problem(source)), source)


def _label_array_from_pil(image: Image.Image, source: str) -> np.ndarray:
    # Palette ("P") masks store label ids as palette indices, so the indices are kept, never the colours.
    if image.mode in ("L", "P", "1"):
        return np.array(image, dtype=np.uint8)
    if image.mode.startswith("I"):
        return _label_array_from_array(np.array(image), source)
    raise UnreadableMaskError(
        source, f"mask has mode {image.mode}; expected a single-channel label-id image (L, P or I)"
    )


def read_label_map(label_path: str | os.PathLike[str], level: LabelSet | int | None = 3) -> np.ndarray:
    """Decode a label-id image (mode L/P/I, values kept) or rasterise an IDD polygon JSON at ``level``."""
    path = os.fspath(label_path)
    if path.endswith(".json"):
        idd_level = label_level(level)
        if idd_level is None:
            raise DataError(f"{path}: polygon JSON needs an IDD label set (idd-level1..4), not a custom one")
        check_regular_file(path, _mask_problem(path))
        try:
            with open(path, encoding="utf-8") as handle:
                annotation = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise UnreadableMaskError(path, f"not valid JSON ({err})") from err
        except OSError as err:
            raise UnreadableMaskError(path, f"cannot be read ({err.strerror or err})") from err
        return rasterize_polygons(annotation, idd_level, source=path)
    with open_stored_image(path, _mask_problem(path)) as image:
        return _decoded_mask(image, path)


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
        with open_stored_image(data, _mask_problem(source)) as image:
            return _decoded_mask(image, source)
    if isinstance(value, Image.Image):
        if _is_lossy(value):
            raise UnreadableMaskError(source, f"mask is a {value.format} image, a lossy format; store masks as PNG")
        return _label_array_from_pil(value, source)
    return _label_array_from_array(np.asarray(value), source)


def _image_array(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise UnreadableImageError(source, f"image array has shape {array.shape}; expected (height, width, 3)")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise UnreadableImageError(source, f"image array has dtype {array.dtype}; expected uint8 values 0-255")
        array = array.astype(np.uint8)
    return array


def _check_mode(mode: str, source: str) -> None:
    if mode not in _CONVERTIBLE:
        raise _image_problem(source)(
            f"mode {mode} has no faithful RGB conversion; store images as 8-bit RGB or greyscale, or 16-bit greyscale"
        )


def _as_rgb(image: Image.Image, source: str) -> Image.Image:
    """A decoded image in RGB: 16-bit greyscale scaled to 8 bits, modes without a faithful conversion refused."""
    _check_mode(image.mode, source)
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise _image_problem(source)(f"mode {image.mode} holds values {low}..{high}; expected 0-65535")
        eight_bit = high <= 255 and image.mode == "I"
        values = values if eight_bit else values >> 8
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def to_rgb_image(value: Any, source: str = "<image>") -> Image.Image:
    """Any stored image (path, encoded or npy bytes, PIL image, array) as a loaded PIL RGB image."""
    if isinstance(value, dict):
        return to_rgb_image(_open_bytes_or_path(value), source)
    if isinstance(value, Image.Image):
        return _as_rgb(value, source)
    if isinstance(value, (bytes, bytearray, memoryview)) and bytes(value[:6]) == NPY_MAGIC:
        return to_rgb_image(np.load(io.BytesIO(bytes(value)), allow_pickle=False), source)
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        stored = value if isinstance(value, (str, os.PathLike)) else bytes(value)
        with open_stored_image(stored, _image_problem(source)) as image:
            return _as_rgb(decode_upright(image, _image_problem(source)), source)
    if value is None:
        raise UnreadableImageError(source, "has no image")
    return Image.fromarray(_image_array(np.asarray(value), source)).convert("RGB")


def image_size(value: Any, source: str) -> tuple[int, int]:
    """(height, width) of a stored image as decoded (EXIF orientation applied), its integrity checked from headers.

    Refusals raise `UnreadableImageError` naming ``source``: missing, empty, not a regular file, not an image,
    truncated or corrupt, a decompression bomb, or a mode without a faithful RGB conversion.
    """
    if isinstance(value, dict):
        return image_size(_open_bytes_or_path(value), source)
    if isinstance(value, Image.Image):
        _check_mode(value.mode, source)
        return value.height, value.width
    if isinstance(value, (bytes, bytearray, memoryview)) and bytes(value[:6]) == NPY_MAGIC:
        value = np.load(io.BytesIO(bytes(value)), allow_pickle=False)
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        stored = os.fspath(value) if isinstance(value, (str, os.PathLike)) else bytes(value)
        problem = _image_problem(source)
        with open_stored_image(stored, problem) as image:
            _check_mode(image.mode, source)
            size = upright_size(image, stored, problem)
            check_integrity(image, problem)
        return size
    if value is None:
        raise UnreadableImageError(source, "has no image")
    array = _image_array(np.asarray(value), source)
    return int(array.shape[0]), int(array.shape[1])
