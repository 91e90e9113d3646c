"""Label sets: the official IDD (AutoNUE) hierarchy at levels 1-4, and custom ``id2label`` files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

IGNORE_INDEX = 255
IDD_PREFIX = "idd-level"
# OpenCV histograms count in float32, exact only below 2**24 per bin.
FLOAT32_EXACT_LIMIT = 1 << 24


class LabelSetError(ValueError):
    """A label set that cannot be used; the message names it (or its file) and the problem in one line."""


class RawLabel(NamedTuple):
    """One row of the official AutoNUE label table (``helpers/anue_labels.py``)."""

    name: str
    raw_id: int
    level4: int
    level3: int
    level2: int
    level1: int
    color: tuple[int, int, int]


# The official table, in its order. 255 at a level means "ignored at that level".
RAW_LABELS: tuple[RawLabel, ...] = (
    RawLabel("road", 0, 0, 0, 0, 0, (128, 64, 128)),
    RawLabel("parking", 1, 1, 1, 1, 0, (250, 170, 160)),
    RawLabel("drivable fallback", 2, 2, 1, 1, 0, (81, 0, 81)),
    RawLabel("sidewalk", 3, 3, 2, 2, 1, (244, 35, 232)),
    RawLabel("rail track", 4, 3, 3, 3, 1, (230, 150, 140)),
    RawLabel("non-drivable fallback", 5, 4, 3, 3, 1, (152, 251, 152)),
    RawLabel("person", 6, 5, 4, 4, 2, (220, 20, 60)),
    RawLabel("animal", 7, 6, 4, 4, 2, (246, 198, 145)),
    RawLabel("rider", 8, 7, 5, 5, 2, (255, 0, 0)),
    RawLabel("motorcycle", 9, 8, 6, 6, 3, (0, 0, 230)),
    RawLabel("bicycle", 10, 9, 7, 6, 3, (119, 11, 32)),
    RawLabel("autorickshaw", 11, 10, 8, 7, 3, (255, 204, 54)),
    RawLabel("car", 12, 11, 9, 7, 3, (0, 0, 142)),
    RawLabel("truck", 13, 12, 10, 8, 3, (0, 0, 70)),
    RawLabel("bus", 14, 13, 11, 8, 3, (0, 60, 100)),
    RawLabel("caravan", 15, 14, 12, 8, 3, (0, 0, 90)),
    RawLabel("trailer", 16, 15, 12, 8, 3, (0, 0, 110)),
    RawLabel("train", 17, 15, 12, 8, 3, (0, 80, 100)),
    RawLabel("vehicle fallback", 18, 15, 12, 8, 3, (136, 143, 153)),
    RawLabel("curb", 19, 16, 13, 9, 4, (220, 190, 40)),
    RawLabel("wall", 20, 17, 14, 9, 4, (102, 102, 156)),
    RawLabel("fence", 21, 18, 15, 10, 4, (190, 153, 153)),
    RawLabel("guard rail", 22, 19, 16, 10, 4, (180, 165, 180)),
    RawLabel("billboard", 23, 20, 17, 11, 4, (174, 64, 67)),
    RawLabel("traffic sign", 24, 21, 18, 11, 4, (220, 220, 0)),
    RawLabel("traffic light", 25, 22, 19, 11, 4, (250, 170, 30)),
    RawLabel("pole", 26, 23, 20, 12, 4, (153, 153, 153)),
    RawLabel("polegroup", 27, 23, 20, 12, 4, (153, 153, 153)),
    RawLabel("obs-str-bar-fallback", 28, 24, 21, 12, 4, (169, 187, 214)),
    RawLabel("building", 29, 25, 22, 13, 5, (70, 70, 70)),
    RawLabel("bridge", 30, 26, 23, 13, 5, (150, 100, 100)),
    RawLabel("tunnel", 31, 26, 23, 13, 5, (150, 120, 90)),
    RawLabel("vegetation", 32, 27, 24, 14, 5, (107, 142, 35)),
    RawLabel("sky", 33, 28, 25, 15, 6, (70, 130, 180)),
    RawLabel("fallback background", 34, 29, 25, 15, 6, (169, 187, 214)),
    RawLabel("unlabeled", 35, 255, 255, 255, 255, (0, 0, 0)),
    RawLabel("ego vehicle", 36, 255, 255, 255, 255, (0, 0, 0)),
    RawLabel("rectification border", 37, 255, 255, 255, 255, (0, 0, 0)),
    RawLabel("out of roi", 38, 255, 255, 255, 255, (0, 0, 0)),
    RawLabel("license plate", 39, 255, 255, 255, 255, (0, 0, 142)),
)

# Level-2 and level-1 group names are not rows of the raw table; the official README names them.
LEVEL2_NAMES = (
    "road", "drivable fallback", "sidewalk", "non-drivable fallback", "person", "rider", "2-wheeler",
    "car-auto", "large-vehicle", "curb-wall", "fence-guard rail", "info-structures", "obs-fallback",
    "construction", "vegetation", "sky",
)
LEVEL1_NAMES = (
    "drivable", "non-drivable", "living-things", "vehicles", "road-side-objs", "far-objects", "sky",
)
# At level 3 a merged id takes the name of the row whose name it keeps in the benchmark table.
LEVEL3_NAMES = (
    "road", "drivable fallback", "sidewalk", "non-drivable fallback", "person", "rider", "motorcycle",
    "bicycle", "autorickshaw", "car", "truck", "bus", "vehicle fallback", "curb", "wall", "fence",
    "guard rail", "billboard", "traffic sign", "traffic light", "pole", "obs-str-bar-fallback",
    "building", "bridge", "vegetation", "sky",
)
IDD_LEVELS = (1, 2, 3, 4)


@dataclass(frozen=True)
class LabelSet:
    """Class names and colours indexed by training id, plus the coarser levels they fold into."""

    name: str
    id2label: dict[int, str]
    colors: dict[int, tuple[int, int, int]]
    coarser: dict[str, dict[int, int]] = field(default_factory=dict)
    coarser_names: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        """Number of classes (ids are 0..num_labels-1)."""
        return len(self.id2label)

    @property
    def idd_level(self) -> int | None:
        """The IDD level of an ``idd-level<N>`` set (``idd-level3`` -> 3); None for a custom label set."""
        return idd_level_of(self.name)

    @property
    def label2id(self) -> dict[str, int]:
        """Inverse of ``id2label``."""
        return {name: idx for idx, name in self.id2label.items()}

    @property
    def palette(self) -> np.ndarray:
        """A (256, 3) uint8 colour table; ignore and unused ids are black."""
        table = np.zeros((256, 3), dtype=np.uint8)
        for idx, color in self.colors.items():
            table[idx] = color
        return table

    def lookup_to(self, level: str) -> np.ndarray:
        """A 256-entry uint8 table mapping this set's ids to a coarser level (255 stays 255)."""
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for src, dst in self.coarser[level].items():
            table[src] = dst
        return table


def idd_level_of(name: str) -> int | None:
    """The ``N`` of ``idd-level<N>``, or None for any other name."""
    suffix = name[len(IDD_PREFIX):]
    return int(suffix) if name.startswith(IDD_PREFIX) and suffix.isdigit() else None


def pixel_counts(label_map: np.ndarray) -> np.ndarray:
    """Pixel count (int64) of every value of a label map, 256 entries at least: OpenCV's histogram for uint8 maps.

    ``calcHist`` is several times faster than ``np.bincount`` on uint8 maps (BENCHMARKS.md); other dtypes, empty
    maps and maps too large for its float32 counts go through ``np.bincount``.
    """
    label_map = np.asarray(label_map)
    if label_map.dtype != np.uint8 or not 0 < label_map.size < FLOAT32_EXACT_LIMIT:
        return np.bincount(label_map.ravel(), minlength=256).astype(np.int64)
    flat = np.ascontiguousarray(label_map).reshape(-1)
    return cv2.calcHist([flat], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def _first_row_per_id(level_attr: str) -> dict[int, RawLabel]:
    rows: dict[int, RawLabel] = {}
    for row in RAW_LABELS:
        idx = getattr(row, level_attr)
        if idx != IGNORE_INDEX:
            rows.setdefault(idx, row)
    return rows


def raw_name_to_id(level: int = 3) -> dict[str, int]:
    """Map every raw IDD polygon label name to its training id at ``level`` (255 = ignore)."""
    if level not in IDD_LEVELS:
        raise ValueError(f"IDD level must be one of {IDD_LEVELS}, got {level}")
    return {row.name: getattr(row, f"level{level}") for row in RAW_LABELS}


def idd_label_set(level: int = 3) -> LabelSet:
    """The official IDD label set at ``level`` (1-4), with mappings to every coarser level."""
    if level not in IDD_LEVELS:
        raise LabelSetError(f"IDD level must be one of {IDD_LEVELS}, got {level}")
    first_rows = _first_row_per_id(f"level{level}")
    if level == 4:
        level3_names = set(LEVEL3_NAMES)
        names = {}
        for idx in first_rows:
            sharing = [r.name for r in RAW_LABELS if r.level4 == idx]
            names[idx] = next((n for n in sharing if n in level3_names), sharing[0])
        colors = {idx: next(r.color for r in RAW_LABELS if r.name == names[idx]) for idx in names}
    else:
        table_names = {1: LEVEL1_NAMES, 2: LEVEL2_NAMES, 3: LEVEL3_NAMES}[level]
        names = dict(enumerate(table_names))
        # A level-1/2 group is drawn in the colour of the first level-3 class it holds.
        level3_colors = {r.level3: r.color for r in RAW_LABELS if r.name in LEVEL3_NAMES}
        colors = {idx: level3_colors[row.level3] for idx, row in first_rows.items()}
    coarser = {
        f"level{coarse}": {idx: getattr(row, f"level{coarse}") for idx, row in first_rows.items()}
        for coarse in IDD_LEVELS
        if coarse < level
    }
    coarser_names = {
        f"level{coarse}": dict(enumerate({1: LEVEL1_NAMES, 2: LEVEL2_NAMES, 3: LEVEL3_NAMES}[coarse]))
        for coarse in IDD_LEVELS
        if coarse < level
    }
    return LabelSet(f"{IDD_PREFIX}{level}", names, colors, coarser, coarser_names)


def _default_color(idx: int) -> tuple[int, int, int]:
    # A fixed golden-ratio hue walk keeps custom classes distinguishable without a colour file.
    hue = (idx * 0.618033988749895) % 1.0
    rgb = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
    return tuple(int(v) for v in (rgb * 200 + 40).round())


def custom_label_set(name: str, id2label: dict[int, str], colors: dict | None = None) -> LabelSet:
    """A label set from class names, with given colours (by id or str id) or generated distinguishable ones."""
    colors = colors or {}
    palette = {
        idx: tuple(int(c) for c in colors.get(idx, colors.get(str(idx), _default_color(idx)))) for idx in id2label
    }
    return LabelSet(name, dict(id2label), palette)


def _no_duplicate_keys(path: Path, pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys silently; a class listed twice is a mistake to report.
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise LabelSetError(f"{path}: key {repeated[0]!r} appears more than once")
    return dict(pairs)


def _parse_colors(path: Path, raw: object, id2label: dict[int, str]) -> dict[int, tuple[int, int, int]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LabelSetError(f"{path}: 'colors' must map class ids to [R, G, B]")
    colors = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit() and int(key) in id2label):
            raise LabelSetError(f"{path}: colour for {key!r}, which is not a class id of this label set")
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
            raise LabelSetError(f"{path}: colour of class {key} must be [R, G, B] with integers 0-255, got {value!r}")
        colors[int(key)] = tuple(value)
    return colors


def load_id2label_file(path: str | Path) -> LabelSet:
    """A custom label set from a JSON file: ``{"0": "road", ...}`` or ``{"id2label": {...}, "colors": {...}}``.

    Raises `LabelSetError` naming the file for a missing or unreadable file, text that is not a JSON object, ids
    that are not integers 0..N-1 without gaps or repeats, empty or repeated class names, more than 255 classes
    (255 means ignore) or malformed colours.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        # Reading a FIFO or a device would block forever.
        raise LabelSetError(f"{path}: the label set is not a regular file (a directory, FIFO or device)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelSetError(f"{path}: label set file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LabelSetError(f"{path}: cannot read the label set file ({err})") from err
    try:
        payload = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicate_keys(path, pairs))
    except json.JSONDecodeError as err:
        raise LabelSetError(f"{path}: not valid JSON ({err})") from err
    except RecursionError:
        raise LabelSetError(f"{path}: JSON nested too deeply to be a label set") from None
    wrapped = isinstance(payload, dict) and "id2label" in payload
    id2label_raw = payload["id2label"] if wrapped else payload
    if not isinstance(id2label_raw, dict) or not id2label_raw:
        raise LabelSetError(f"{path}: expected a JSON object mapping class ids to names, e.g. {{\"0\": \"road\"}}")
    id2label: dict[int, str] = {}
    for key, name in id2label_raw.items():
        if not key.strip().lstrip("-").isdigit():
            raise LabelSetError(f"{path}: class ids must be integers, got {key!r}")
        if int(key) in id2label:
            raise LabelSetError(f"{path}: class id {int(key)} appears more than once")
        if not isinstance(name, str) or not name.strip():
            raise LabelSetError(f"{path}: the name of class {key} must be a non-empty string, got {name!r}")
        id2label[int(key)] = name
    if len(id2label) > IGNORE_INDEX:
        raise LabelSetError(f"{path}: {len(id2label)} classes, at most {IGNORE_INDEX} are supported (255 means ignore)")
    if sorted(id2label) != list(range(len(id2label))):
        missing = sorted(set(range(len(id2label))) - set(id2label))
        raise LabelSetError(f"{path}: class ids must be 0..{len(id2label) - 1} without gaps; missing {missing[:5]}")
    names = list(id2label.values())
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise LabelSetError(f"{path}: class name {repeated!r} is given to more than one id")
    colors = _parse_colors(path, payload.get("colors") if wrapped else None, id2label)
    return custom_label_set(path.stem, dict(sorted(id2label.items())), colors)


def get_label_set(spec: str | None = None) -> LabelSet:
    """Resolve ``idd-level1..4`` (or ``idd``, meaning level 3) or a path to an ``id2label`` JSON file; None: level 3."""
    if spec is None:
        return idd_label_set(3)
    if spec == "idd":
        return idd_label_set(3)
    level = idd_level_of(spec)
    if level is not None:
        return idd_label_set(level)
    if spec.endswith(".json") or Path(spec).is_file():
        return load_id2label_file(spec)
    raise LabelSetError(
        f"unknown label set {spec!r}: use idd-level1, idd-level2, idd-level3, idd-level4 "
        "or the path of an id2label JSON file"
    )
