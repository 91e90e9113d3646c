"""IDD formats: the file naming of an IDD tree and the rasterisation of its polygon annotations."""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..labels import IGNORE_INDEX, raw_name_to_id
from .errors import DataError

GROUP_SUFFIX = "group"
IDD_IMAGE_SUFFIX = "_leftImg8bit"
IDD_POLYGON_SUFFIX = "_gtFine_polygons.json"


def idd_frame_name(path: str | os.PathLike[str]) -> str:
    """The frame id of an image path: its file name without the extension and an IDD ``_leftImg8bit`` suffix."""
    stem = PurePosixPath(os.fspath(path).replace("\\", "/")).name.rsplit(".", 1)[0]
    return stem.removesuffix(IDD_IMAGE_SUFFIX)


def idd_label_suffix(level: int) -> str:
    """The file ending of an IDD label-id map at ``level``: ``_gtFine_labellevel<N>Ids.png``."""
    return f"_gtFine_labellevel{level}Ids.png"


def rasterize_polygons(annotation: dict[str, Any], level: int = 3, source: str = "<polygons>") -> np.ndarray:
    """Rasterise an IDD ``*_gtFine_polygons.json`` payload into a uint8 label map by the official rules.

    A malformed payload (missing or non-positive size, a size over PIL's decompression-bomb limit, an object
    without a label or with non-finite coordinates) raises `DataError` naming ``source``.
    """
    name_to_id = raw_name_to_id(level)
    try:
        height, width = int(annotation["imgHeight"]), int(annotation["imgWidth"])
        objects = annotation.get("objects", [])
        if not isinstance(objects, list):
            raise TypeError(f"'objects' is a {type(objects).__name__}, not a list")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise DataError(f"{source}: not an IDD polygon annotation ({err!r})") from err
    if height < 1 or width < 1 or height * width > (Image.MAX_IMAGE_PIXELS or 2**62):
        raise DataError(f"{source}: image size {height}x{width} is not a plausible image size")
    canvas = Image.new("L", (width, height), IGNORE_INDEX)
    drawer = ImageDraw.Draw(canvas)
    for index, obj in enumerate(objects):
        try:
            if obj.get("deleted"):
                continue
            raw_name = name = obj["label"]
            if not isinstance(name, str):
                raise TypeError(f"label {name!r} is not a string")
            polygon = [(float(x), float(y)) for x, y in obj["polygon"]]
            if not np.isfinite(polygon).all():
                raise ValueError("polygon has non-finite coordinates")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            raise DataError(f"{source}: object {index} is malformed ({err!r})") from err
        if name not in name_to_id and name.endswith(GROUP_SUFFIX):
            name = name[: -len(GROUP_SUFFIX)]
        if name not in name_to_id:
            raise DataError(f"{source}: unknown IDD label name {raw_name!r}")
        if len(polygon) < 3:
            continue
        drawer.polygon(polygon, fill=name_to_id[name])
    return np.asarray(canvas, dtype=np.uint8)
