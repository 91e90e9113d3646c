"""Finding, validating, loading and splitting segmentation datasets of every supported layout."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .labels import IGNORE_INDEX, raw_name_to_id

GROUP_SUFFIX = "group"


def rasterize_polygons(annotation: dict[str, Any], level: int = 3, source: str = "<polygons>") -> np.ndarray:
    """Rasterise an IDD ``*_gtFine_polygons.json`` payload into a uint8 label map by the official rules."""
    name_to_id = raw_name_to_id(level)
    height, width = int(annotation["imgHeight"]), int(annotation["imgWidth"])
    canvas = Image.new("L", (width, height), IGNORE_INDEX)
    drawer = ImageDraw.Draw(canvas)
    for obj in annotation.get("objects", []):
        if obj.get("deleted"):
            continue
        name = obj["label"]
        if name not in name_to_id and name.endswith(GROUP_SUFFIX):
            name = name[: -len(GROUP_SUFFIX)]
        if name not in name_to_id:
            raise ValueError(f"{source}: unknown IDD label name {obj['label']!r}")
        polygon = [(float(x), float(y)) for x, y in obj["polygon"]]
        if len(polygon) < 3:
            continue
        drawer.polygon(polygon, fill=name_to_id[name])
    return np.asarray(canvas, dtype=np.uint8)
