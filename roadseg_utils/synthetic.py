"""Procedural road scenes written in the IDD layout: the embedded default dataset for the demo, tests and benchmarks.

Every frame is an ordered list of IDD polygons with raw IDD label names (later polygons on top). The
``*_gtFine_polygons.json`` holds that list, the ``*_gtFine_labellevel3Ids.png`` is ``rasterize_polygons`` of it,
and the image paints the same polygons with class-related colours, textures and lighting.

``--domain cityscapes`` writes the *source* domain the packaged pretrained tiny checkpoint learnt from: the same
scene grammar with a European look (cool bright light, other palette, right-hand traffic, a car hood in every frame,
more cars and buildings, no autorickshaws or animals), labelled with Cityscapes' 19 train ids in
``*_gtFine_labelTrainIds.png`` and an ``id2label.json`` at the top of the folder.

Usage:
    python -m roadseg_utils.synthetic --output_dir data/synthetic --num_images 300 --num_sequences 12 --seed 0
    python -m roadseg_utils.synthetic --output_dir data/source --domain cityscapes --num_images 600 --seed 0
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from transformers import HfArgumentParser
from transformers.utils import logging

from .atomic import write_atomically, write_text_atomically
from .cli import parse_size
from .data import IDD_IMAGE_SUFFIX, IDD_POLYGON_SUFFIX, idd_label_suffix, rasterize_polygons
from .labels import IGNORE_INDEX, LEVEL3_NAMES, idd_label_set, pixel_counts, raw_name_to_id

logger = logging.get_logger(__name__)

IMAGE_SUFFIX = f"{IDD_IMAGE_SUFFIX}.png"
LABEL_SUFFIX = idd_label_suffix(3)
POLYGONS_SUFFIX = IDD_POLYGON_SUFFIX
MIN_IMAGE_SIDE = 16

# Pinhole camera in metres; the focal length is in image widths (about a 64 degree field of view, like a dashcam).
FOCAL_LENGTH = 0.8
CAMERA_HEIGHT = 1.5
NEAR_Z = 1.0
FAR_Z = 400.0

ENVIRONMENTS = ("urban", "suburban", "highway", "rural")
ENVIRONMENT_WEIGHTS = (0.4, 0.25, 0.15, 0.2)
LIGHTINGS = ("day", "overcast", "dusk", "night")
LIGHTING_WEIGHTS = (0.5, 0.2, 0.15, 0.15)

IDD_DOMAIN = "idd"
SOURCE_DOMAIN = "cityscapes"
DOMAINS = (IDD_DOMAIN, SOURCE_DOMAIN)
SOURCE_ENVIRONMENTS = ("urban", "suburban", "highway")
SOURCE_ENVIRONMENT_WEIGHTS = (0.6, 0.3, 0.1)
SOURCE_LIGHTINGS = ("clear", "cloudy")
SOURCE_LIGHTING_WEIGHTS = (0.6, 0.4)
SOURCE_LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
SOURCE_ID2LABEL_FILE = "id2label.json"
# Cityscapes' 19 evaluated classes in train-id order, as facebook/mask2former-*-cityscapes-semantic name them.
CITYSCAPES_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# How a level-3 IDD class of the scene grammar is labelled in the source domain (Cityscapes' annotation rules:
# a curb is sidewalk; guard rails, bridges, billboards and fallbacks are not among the 19 evaluated classes).
LEVEL3_TO_CITYSCAPES = {
    "road": "road", "drivable fallback": "terrain", "sidewalk": "sidewalk", "non-drivable fallback": "terrain",
    "person": "person", "rider": "rider", "motorcycle": "motorcycle", "bicycle": "bicycle", "car": "car",
    "truck": "truck", "bus": "bus", "curb": "sidewalk", "wall": "wall", "fence": "fence",
    "traffic sign": "traffic sign", "traffic light": "traffic light", "pole": "pole", "building": "building",
    "vegetation": "vegetation", "sky": "sky",
}

# Per environment (urban, suburban, highway, rural): Poisson means for counts, probabilities for "p_" entries.
# The rare level-3 classes (bus, bicycle, traffic light, fence, guard rail, bridge) stay under ~10 % of images.
RATES: dict[str, tuple[float, float, float, float]] = {
    "cars": (5.0, 3.0, 4.0, 1.2),
    "autorickshaws": (2.5, 1.5, 0.3, 0.6),
    "motorcycles": (3.0, 2.0, 0.8, 1.0),
    "persons": (3.0, 2.0, 0.3, 1.2),
    "trucks": (0.35, 0.4, 1.0, 0.4),
    "vehicle_fallbacks": (0.2, 0.3, 0.1, 0.5),
    "animals": (0.05, 0.1, 0.02, 0.4),
    "poles": (4.0, 3.0, 2.0, 1.5),
    "signs": (1.5, 1.2, 1.0, 0.6),
    "trees": (2.0, 4.0, 3.0, 8.0),
    "barricades": (0.5, 0.3, 0.2, 0.1),
    "billboards": (0.5, 0.4, 0.3, 0.15),
    "p_buildings": (0.95, 0.6, 0.15, 0.25),
    "p_wall": (0.35, 0.45, 0.1, 0.3),
    "p_bus": (0.07, 0.05, 0.08, 0.03),
    "p_bicycle": (0.08, 0.07, 0.0, 0.08),
    "p_traffic_light": (0.12, 0.06, 0.0, 0.0),
    "p_fence": (0.06, 0.08, 0.05, 0.08),
    "p_guard_rail": (0.0, 0.02, 0.3, 0.03),
    "p_bridge": (0.05, 0.04, 0.06, 0.02),
    "p_gantry": (0.0, 0.0, 0.3, 0.0),
    "p_polegroup": (0.1, 0.05, 0.0, 0.0),
    "p_cargroup": (0.12, 0.08, 0.05, 0.0),
    "p_persongroup": (0.1, 0.05, 0.0, 0.03),
    "p_parking": (0.1, 0.08, 0.0, 0.0),
    "p_hills": (0.05, 0.15, 0.35, 0.4),
    "p_rail_track": (0.0, 0.02, 0.0, 0.05),
    "p_deleted": (0.05, 0.05, 0.05, 0.05),
    "p_degenerate": (0.03, 0.03, 0.03, 0.03),
}
# The source domain's class frequencies (urban, suburban, highway; the rural column is unused): denser cars and
# buildings, bicycles, no autorickshaws, animals or IDD annotation quirks.
SOURCE_RATES = {**RATES, **{
    "cars": (8.0, 5.0, 6.0, 0.0),
    "autorickshaws": (0.0, 0.0, 0.0, 0.0),
    "motorcycles": (0.6, 0.4, 0.3, 0.0),
    "persons": (4.0, 2.0, 0.1, 0.0),
    "trucks": (0.5, 0.4, 1.5, 0.0),
    "vehicle_fallbacks": (0.0, 0.0, 0.0, 0.0),
    "animals": (0.0, 0.0, 0.0, 0.0),
    "trees": (3.0, 5.0, 2.0, 0.0),
    "billboards": (0.1, 0.1, 0.1, 0.0),
    "p_buildings": (1.0, 0.9, 0.3, 0.0),
    "p_bus": (0.2, 0.1, 0.1, 0.0),
    "p_bicycle": (0.4, 0.3, 0.0, 0.0),
    "p_traffic_light": (0.5, 0.25, 0.0, 0.0),
    "p_fence": (0.2, 0.3, 0.2, 0.0),
    "p_hills": (0.0, 0.05, 0.2, 0.0),
    "p_deleted": (0.0, 0.0, 0.0, 0.0),
    "p_degenerate": (0.0, 0.0, 0.0, 0.0),
}}

# Appearance of each level-3 class before lighting: a plausible colour, pulled towards the official palette so a
# tiny model can tell classes apart, plus per-pixel grain and low-frequency blotches of class-specific strength.
NATURAL_COLORS: dict[str, tuple[int, int, int]] = {
    "road": (105, 100, 108),
    "drivable fallback": (135, 115, 90),
    "sidewalk": (170, 150, 155),
    "non-drivable fallback": (120, 135, 85),
    "person": (150, 90, 85),
    "rider": (150, 70, 70),
    "motorcycle": (50, 55, 110),
    "bicycle": (120, 45, 55),
    "autorickshaw": (200, 185, 50),
    "car": (80, 90, 160),
    "truck": (95, 70, 80),
    "bus": (60, 110, 140),
    "vehicle fallback": (140, 140, 125),
    "curb": (215, 195, 90),
    "wall": (150, 140, 160),
    "fence": (175, 150, 140),
    "guard rail": (190, 185, 195),
    "billboard": (195, 85, 80),
    "traffic sign": (225, 215, 60),
    "traffic light": (70, 65, 35),
    "pole": (145, 145, 145),
    "obs-str-bar-fallback": (185, 175, 205),
    "building": (125, 112, 100),
    "bridge": (160, 125, 115),
    "vegetation": (70, 125, 40),
    "sky": (150, 195, 240),
}
PALETTE_PULL = 0.4
# The source domain's European palette: grey asphalt and stone, dark foliage, silver and dark cars.
SOURCE_COLORS = {**NATURAL_COLORS, **{
    "road": (84, 86, 92), "sidewalk": (150, 148, 150), "non-drivable fallback": (95, 120, 70),
    "drivable fallback": (95, 120, 70), "building": (150, 145, 140), "wall": (170, 160, 150),
    "vegetation": (45, 85, 40), "car": (150, 155, 165), "truck": (200, 200, 195), "bus": (190, 60, 50),
    "person": (60, 60, 80), "rider": (70, 60, 90), "curb": (150, 148, 150), "pole": (90, 95, 100),
    "traffic sign": (40, 80, 190), "fence": (110, 115, 105),
}}
UNLABELLED_COLORS = {"ego vehicle": (40, 40, 45), "license plate": (235, 235, 225)}
GRAIN = {"road": 7, "drivable fallback": 12, "sidewalk": 9, "non-drivable fallback": 14, "vegetation": 16,
         "building": 8, "wall": 9, "bridge": 8, "sky": 1.5, "curb": 6, "obs-str-bar-fallback": 6}
BLOTCH = {"road": 0.25, "drivable fallback": 0.35, "sidewalk": 0.2, "non-drivable fallback": 0.45,
          "vegetation": 0.5, "building": 0.3, "wall": 0.3, "bridge": 0.25, "sky": 0.12}
DEFAULT_GRAIN = 5.0
DEFAULT_BLOTCH = 0.1


class Lighting(NamedTuple):
    """Global look of a sequence: gain, colour cast, saturation, horizon haze, sensor noise and sky colour."""

    gain: float
    tint: tuple[float, float, float]
    saturation: float
    haze: float
    noise: float
    sky: tuple[int, int, int]


LIGHTING_PRESETS = {
    "day": Lighting(1.0, (1.0, 1.0, 1.0), 1.0, 0.18, 2.0, (150, 195, 240)),
    "overcast": Lighting(0.85, (0.98, 1.0, 1.03), 0.6, 0.3, 2.5, (195, 200, 205)),
    "dusk": Lighting(0.7, (1.15, 0.92, 0.78), 0.9, 0.25, 3.5, (235, 165, 120)),
    "night": Lighting(0.32, (0.85, 0.92, 1.2), 0.8, 0.1, 5.0, (35, 45, 80)),
    # The source domain's light: cool, bright, low noise.
    "clear": Lighting(1.12, (0.92, 0.98, 1.1), 0.8, 0.08, 1.0, (175, 205, 235)),
    "cloudy": Lighting(0.95, (0.95, 0.98, 1.02), 0.55, 0.2, 1.5, (205, 210, 215)),
}

# Outlines in units of the object's width (x, centred) and height (y, up from its base).
PERSON_OUTLINE = np.array([
    (-0.3, 0), (-0.08, 0), (0, 0.42), (0.08, 0), (0.3, 0), (0.22, 0.48), (0.5, 0.52), (0.45, 0.78), (0.2, 0.82),
    (0.16, 0.86), (0.2, 0.95), (0, 1), (-0.2, 0.95), (-0.16, 0.86), (-0.2, 0.82), (-0.45, 0.78), (-0.5, 0.52),
    (-0.22, 0.48),
])
RIDER_OUTLINE = np.array([
    (-0.5, 0), (-0.3, 0), (-0.3, 0.35), (0.3, 0.35), (0.3, 0), (0.5, 0), (0.5, 0.4), (0.4, 0.45), (0.55, 0.72),
    (0.24, 0.78), (0.2, 0.83), (0.24, 0.93), (0, 1), (-0.24, 0.93), (-0.2, 0.83), (-0.24, 0.78), (-0.55, 0.72),
    (-0.4, 0.45), (-0.5, 0.4),
])
ANIMAL_OUTLINE = np.array([
    (-0.5, 0.5), (-0.5, 0.85), (-0.3, 0.9), (0.3, 0.9), (0.42, 1.0), (0.55, 0.95), (0.55, 0.75), (0.4, 0.7),
    (0.4, 0.5), (0.35, 0), (0.28, 0), (0.28, 0.45), (-0.3, 0.45), (-0.32, 0), (-0.4, 0), (-0.42, 0.5),
])
BARRICADE_OUTLINE = np.array([(-0.5, 0), (-0.42, 0), (-0.42, 0.45), (0.42, 0.45), (0.42, 0), (0.5, 0), (0.5, 1),
                              (-0.5, 1)])
RECTANGLE_OUTLINE = np.array([(-0.5, 0), (0.5, 0), (0.5, 1), (-0.5, 1)])
_ANGLES = np.linspace(0, 2 * np.pi, 17)[:-1]
CIRCLE_OUTLINE = np.stack([0.5 * np.cos(_ANGLES), 0.5 + 0.5 * np.sin(_ANGLES)], axis=1)
OCTAGON_OUTLINE = CIRCLE_OUTLINE[::2]
TRIANGLE_OUTLINE = np.array([(-0.5, 0.1), (0.5, 0.1), (0, 1)])
SIGN_OUTLINES = (CIRCLE_OUTLINE, OCTAGON_OUTLINE, TRIANGLE_OUTLINE, RECTANGLE_OUTLINE)


@dataclass(frozen=True)
class SyntheticFrame:
    """One written frame: its sequence and frame name, its file paths (no polygons in the source domain), classes."""

    sequence: str
    frame: str
    image_path: Path
    label_path: Path
    polygons_path: Path | None
    classes: tuple[int, ...]


@dataclass(frozen=True)
class SequenceStyle:
    """What the frames of one sequence share: place, light, camera pose and road cross-section."""

    environment: str
    lighting: str
    horizon: float
    vanish_x: float
    bend: float
    camera_lateral: float
    road_half_width: float
    shoulder: tuple[float, float]
    curb: tuple[bool, bool]
    sidewalk: tuple[float, float]
    setback: tuple[float, float]
    median: str
    ego_hood: float
    ground_label: str
    white_balance: tuple[float, float, float]
    domain: str = IDD_DOMAIN


@dataclass(frozen=True)
class _FrameJob:
    output_dir: str
    split: str
    sequence: str
    frame: str
    index: int
    seed: int
    split_code: int
    image_size: tuple[int, int]
    style: SequenceStyle


@dataclass
class _Shape:
    label: str | None  # None: appearance-only detail (lane marking, window, lamp), never written to the JSON
    points: np.ndarray
    color: tuple[int, int, int]
    emissive: bool = False
    deleted: int = 0


@dataclass(frozen=True)
class _Camera:
    width: int
    height: int
    horizon: float
    vanish_x: float
    bend: float
    lateral: float

    def project(self, lateral: Any, y: Any, z: Any) -> np.ndarray:
        """Pixel coordinates of road-relative points (metres right of the road centre, up from the ground, ahead)."""
        lateral, y, z = np.asarray(lateral, float), np.asarray(y, float), np.asarray(z, float)
        x_world = lateral - self.lateral + self.bend * z**2
        points = np.empty((*np.broadcast_shapes(lateral.shape, y.shape, z.shape), 2))
        points[..., 0] = self.width * (self.vanish_x + FOCAL_LENGTH * x_world / z)
        points[..., 1] = self.height * self.horizon + FOCAL_LENGTH * self.width * (CAMERA_HEIGHT - y) / z
        return points.reshape(-1, 2)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    # Monotone chain; plain floats because the inputs are a handful of projected corners.
    ordered = sorted(map(tuple, points.tolist()))

    def half_hull(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        hull: list[tuple[float, float]] = []
        for x, y in sequence:
            while len(hull) >= 2:
                (ax, ay), (bx, by) = hull[-2], hull[-1]
                if (bx - ax) * (y - ay) - (by - ay) * (x - ax) > 0:
                    break
                hull.pop()
            hull.append((x, y))
        return hull

    if len(ordered) < 3:
        return np.array(ordered, dtype=float).reshape(-1, 2)
    lower, upper = half_hull(ordered), half_hull(ordered[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=float).reshape(-1, 2)


def _clip_polygon(points: np.ndarray, x_max: float, y_max: float) -> np.ndarray:
    # Sutherland-Hodgman against the image rectangle, so the JSON holds in-image coordinates like IDD's.
    if points.min() >= 0 and points[:, 0].max() <= x_max and points[:, 1].max() <= y_max:
        return points
    polygon = points.tolist()
    for axis, limit, keep_below in ((0, 0.0, False), (0, x_max, True), (1, 0.0, False), (1, y_max, True)):
        if not polygon:
            break
        clipped = []
        previous = polygon[-1]
        previous_in = previous[axis] <= limit if keep_below else previous[axis] >= limit
        for current in polygon:
            current_in = current[axis] <= limit if keep_below else current[axis] >= limit
            if current_in != previous_in:
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                crossing = [previous[0] + t * (current[0] - previous[0]), previous[1] + t * (current[1] - previous[1])]
                crossing[axis] = limit
                clipped.append(crossing)
            if current_in:
                clipped.append(current)
            previous, previous_in = current, current_in
        polygon = clipped
    return np.array(polygon, dtype=float).reshape(-1, 2)


def _segments(z0: float, z1: float) -> list[tuple[float, float]]:
    # Long roadside structures are cut into short pieces so that sorting by nearest depth paints them correctly.
    pieces = []
    start = z0
    while start < z1:
        end = min(z1, start + max(3.0, 0.25 * start))
        pieces.append((start, end))
        start = end
    return pieces


def _level3_colors(natural: dict[str, tuple[int, int, int]]) -> dict[str, np.ndarray]:
    palette = idd_label_set(3).colors
    return {
        name: (1 - PALETTE_PULL) * np.array(natural[name], float) + PALETTE_PULL * np.array(palette[idx], float)
        for idx, name in enumerate(LEVEL3_NAMES)
    }


def _class_table(values: dict[str, float], default: float) -> np.ndarray:
    table = np.full(256, default, dtype=np.float32)
    for idx, name in enumerate(LEVEL3_NAMES):
        table[idx] = values.get(name, default)
    return table


_NAME_TO_LEVEL3 = raw_name_to_id(3)
_STRIP_STEPS = np.linspace(0.0, 1.0, 16)
_BAND_STEPS = np.linspace(0.0, 1.0, 4)
_BASE_COLORS = {IDD_DOMAIN: _level3_colors(NATURAL_COLORS), SOURCE_DOMAIN: _level3_colors(SOURCE_COLORS)}
_DOMAIN_RATES = {IDD_DOMAIN: RATES, SOURCE_DOMAIN: SOURCE_RATES}
_CITYSCAPES_TABLE = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_CITYSCAPES_TABLE[[LEVEL3_NAMES.index(name) for name in LEVEL3_TO_CITYSCAPES]] = [
    CITYSCAPES_NAMES.index(name) for name in LEVEL3_TO_CITYSCAPES.values()
]
_GRAIN_TABLE = _class_table(GRAIN, DEFAULT_GRAIN)
_BLOTCH_TABLE = _class_table(BLOTCH, DEFAULT_BLOTCH)


class _SceneBuilder:
    def __init__(self, style: SequenceStyle, camera: _Camera, rng: np.random.Generator, lighting: Lighting) -> None:
        self.style = style
        self.cam = camera
        self.rng = rng
        self.lighting = lighting
        self.env = ENVIRONMENTS.index(style.environment)
        self.background: list[_Shape] = []
        self.groups: list[tuple[float, int, list[_Shape]]] = []
        self.foreground: list[_Shape] = []
        self.annotation_only: list[_Shape] = []
        self.lit = style.lighting in ("dusk", "night")

    def rate(self, key: str) -> float:
        return _DOMAIN_RATES[self.style.domain][key][self.env]

    def chance(self, key: str) -> bool:
        return bool(self.rng.random() < self.rate(key))

    def count(self, key: str) -> int:
        return int(self.rng.poisson(self.rate(key)))

    def color(self, name: str, jitter: float = 12.0, shade: float = 1.0) -> tuple[int, int, int]:
        level3 = _NAME_TO_LEVEL3.get(name, _NAME_TO_LEVEL3.get(name.removesuffix("group")))
        if level3 is None or level3 == IGNORE_INDEX:
            base = np.array(UNLABELLED_COLORS.get(name, (20, 20, 20)), float)
        else:
            base = _BASE_COLORS[self.style.domain][LEVEL3_NAMES[level3]]
        rgb = base * shade + self.rng.normal(0.0, jitter, 3)
        return tuple(int(v) for v in np.clip(rgb, 0, 255).round())

    def add(self, depth: float, shapes: list[_Shape]) -> None:
        self.groups.append((depth, len(self.groups), shapes))

    def log_depth(self, near: float, far: float) -> float:
        return float(np.exp(self.rng.uniform(np.log(near), np.log(far))))

    def box(self, lat0: float, lat1: float, y0: float, y1: float, z0: float, z1: float) -> np.ndarray:
        corners = np.array([(lat, y, z) for lat in (lat0, lat1) for y in (y0, y1) for z in (z0, z1)])
        return self.cam.project(corners[:, 0], corners[:, 1], corners[:, 2])

    def hull(self, *boxes: np.ndarray) -> np.ndarray:
        return _convex_hull(np.concatenate(boxes))

    def strip(self, lat0: float, lat1: float, z0: float = NEAR_Z, z1: float = FAR_Z, y: float = 0.0) -> np.ndarray:
        depths = z0 * (z1 / z0) ** _STRIP_STEPS
        return np.concatenate([self.cam.project(lat0, y, depths), self.cam.project(lat1, y, depths[::-1])])

    def band(self, lat: float, y0: float, y1: float, z0: float, z1: float) -> np.ndarray:
        depths = z0 * (z1 / z0) ** _BAND_STEPS
        return np.concatenate([self.cam.project(lat, y0, depths), self.cam.project(lat, y1, depths[::-1])])

    def facing(self, outline: np.ndarray, lat: float, y: float, z: float, width: float, height: float) -> np.ndarray:
        return self.cam.project(lat + outline[:, 0] * width, y + outline[:, 1] * height, z)

    def ordered_shapes(self) -> list[_Shape]:
        ordered = list(self.background)
        for _, _, shapes in sorted(self.groups, key=lambda group: (-group[0], group[1])):
            ordered.extend(shapes)
        return ordered + self.foreground + self.annotation_only


def _draw_covering(choices: tuple[str, ...], weights: tuple[float, ...], count: int, rng: np.random.Generator
                   ) -> list[str]:
    # Every choice appears once when there is room (a dataset always holds night and highway scenes), the rest
    # follow the weights.
    drawn = list(choices[:count]) + [str(v) for v in rng.choice(choices, size=max(0, count - len(choices)), p=weights)]
    rng.shuffle(drawn)
    return drawn


def _sequence_style(environment: str, lighting: str, rng: np.random.Generator) -> SequenceStyle:
    half_width = {"urban": (3.5, 7.0), "suburban": (3.0, 5.5), "highway": (5.5, 9.0), "rural": (2.5, 4.0)}
    sidewalk_odds = {"urban": (0.85, 1.5, 4.0), "suburban": (0.5, 1.0, 2.5), "highway": (0.0, 1, 1),
                     "rural": (0.1, 0.8, 1.5)}
    shoulder_odds = {"urban": (0.2, 0.5, 1.5), "suburban": (0.6, 0.8, 2.5), "highway": (0.8, 1.5, 3.0),
                     "rural": (0.8, 1.0, 3.0)}
    setback_range = {"urban": (0.3, 2.0), "suburban": (1.0, 6.0), "highway": (4.0, 15.0), "rural": (3.0, 12.0)}
    road_half_width = float(rng.uniform(*half_width[environment]))
    odds, low, high = sidewalk_odds[environment]
    sidewalk = tuple(float(rng.uniform(low, high)) if rng.random() < odds else 0.0 for _ in range(2))
    odds, low, high = shoulder_odds[environment]
    shoulder = tuple(float(rng.uniform(low, high)) if rng.random() < odds else 0.0 for _ in range(2))
    curb = tuple(bool(width > 0 or (environment == "highway" and rng.random() < 0.5)) for width in sidewalk)
    median = "none"
    if road_half_width >= 5.0 and rng.random() < {"urban": 0.3, "highway": 0.7}.get(environment, 0.1):
        median = str(rng.choice(["obs-str-bar-fallback", "curb"], p=[0.6, 0.4]))
    # Traffic keeps left in India: with a median the camera drives in a left lane.
    camera_lateral = -rng.uniform(0.35, 0.7) * road_half_width if median != "none" else rng.uniform(-0.4, 0.2) * (
        road_half_width)
    ground_label = "drivable fallback" if environment in ("suburban", "rural") and rng.random() < 0.2 else (
        "non-drivable fallback")
    return SequenceStyle(
        environment=environment,
        lighting=lighting,
        horizon=float(rng.uniform(0.36, 0.5)),
        vanish_x=float(rng.uniform(0.42, 0.58)),
        bend=float(rng.uniform(-6e-4, 6e-4)),
        camera_lateral=float(camera_lateral),
        road_half_width=road_half_width,
        shoulder=shoulder,
        curb=curb,
        sidewalk=sidewalk,
        setback=tuple(float(rng.uniform(*setback_range[environment])) for _ in range(2)),
        median=median,
        ego_hood=float(rng.uniform(0.06, 0.12)) if rng.random() < 0.3 else 0.0,
        ground_label=ground_label,
        white_balance=tuple(float(v) for v in rng.uniform(0.93, 1.07, 3)),
    )


def _source_style(environment: str, lighting: str, rng: np.random.Generator) -> SequenceStyle:
    """A source-domain sequence: the IDD cross-section mirrored for right-hand traffic, a car hood, open ground."""
    style = _sequence_style(environment, lighting, rng)
    return replace(style, domain=SOURCE_DOMAIN, camera_lateral=-style.camera_lateral, horizon=style.horizon - 0.04,
                   ego_hood=float(rng.uniform(0.07, 0.11)), ground_label="non-drivable fallback")


def _add_sky_and_ground(b: _SceneBuilder) -> None:
    cam, rng = b.cam, b.rng
    width, height = cam.width, cam.height
    full_frame = np.array([(0, 0), (width, 0), (width, height), (0, height)], float)
    sky = np.array(b.lighting.sky, float) * (1 - PALETTE_PULL) + PALETTE_PULL * np.array((70, 130, 180), float)
    b.background.append(_Shape("sky", full_frame, tuple(int(v) for v in sky.round())))
    if b.chance("p_hills"):
        lateral = np.linspace(-2500, 2500, 24)
        tops = np.convolve(rng.uniform(20, 90, 24), np.ones(3) / 3, mode="same")
        outline = np.concatenate([b.cam.project(lateral, tops, 1500.0), b.cam.project(lateral[::-1], 0.0, 1500.0)])
        b.background.append(_Shape("fallback background", outline, b.color("sky", 8, shade=0.8)))
    if b.style.environment in ("urban", "suburban") or rng.random() < 0.3:
        edges = np.sort(rng.uniform(-900, 900, 30))
        tops = rng.uniform(8, 45, 29) * (0.5 if b.style.environment != "urban" else 1.0)
        lateral = np.concatenate([[edges[0]], np.repeat(edges[1:-1], 2), [edges[-1]], [edges[-1], edges[0]]])
        ys = np.concatenate([np.repeat(tops, 2), [0.0, 0.0]])
        b.background.append(_Shape("building", b.cam.project(lateral, ys, 350.0), b.color("building", 10, 0.9)))
    if rng.random() < 0.7:
        lateral = np.linspace(-700, 700, 40)
        tops = np.clip(np.convolve(rng.uniform(-4, 14, 40), np.ones(3) / 3, mode="same"), 1.0, None)
        outline = np.concatenate([b.cam.project(lateral, tops, 300.0), b.cam.project(lateral[::-1], 0.0, 300.0)])
        b.background.append(_Shape("vegetation", outline, b.color("vegetation", 10, 0.8)))
    horizon_row = cam.height * cam.horizon
    ground = np.array([(0, horizon_row), (width, horizon_row), (width, height), (0, height)], float)
    b.background.append(_Shape(b.style.ground_label, ground, b.color(b.style.ground_label, 10)))


def _add_road(b: _SceneBuilder) -> list[tuple[float, float, float]]:
    """Road, shoulders, curbs, sidewalks; returns per side (road-side edge, sidewalk outer edge, structure line)."""
    style, rng = b.style, b.rng
    half = style.road_half_width
    sides = []
    for i, side in enumerate((-1, 1)):
        edge = half
        if style.shoulder[i] > 0:
            b.background.append(_Shape("drivable fallback", b.strip(side * edge, side * (edge + style.shoulder[i])),
                                       b.color("drivable fallback", 10)))
            edge += style.shoulder[i]
        roadside = edge
        if style.curb[i]:
            b.background.append(_Shape("curb", b.strip(side * edge, side * (edge + 0.3)), b.color("curb", 8)))
            edge += 0.3
        if style.sidewalk[i] > 0:
            b.background.append(_Shape("sidewalk", b.strip(side * edge, side * (edge + style.sidewalk[i])),
                                       b.color("sidewalk", 10)))
            edge += style.sidewalk[i]
        sides.append((roadside, edge, edge + style.setback[i]))
    b.background.append(_Shape("road", b.strip(-half, half), b.color("road", 8)))
    lanes = max(1, round(2 * half / 3.5))
    marking = (235, 235, 225) if rng.random() < 0.8 else (230, 200, 60)
    phase = rng.uniform(0, 9)
    for boundary in np.linspace(-half, half, lanes + 1)[1:-1]:
        for start in np.arange(3 + phase, 90, 9.0):
            b.background.append(_Shape(None, b.strip(boundary - 0.07, boundary + 0.07, start, start + 3), marking))
    if style.median == "curb":
        b.background.append(_Shape("curb", b.strip(-0.3, 0.3, 2.0), b.color("curb", 8)))
    if b.chance("p_parking"):
        i = int(rng.integers(2))
        side = (-1, 1)[i]
        start = rng.uniform(8, 20)
        b.background.append(_Shape("parking", b.strip(side * (half - 0.5), side * sides[i][1], start,
                                                       start + rng.uniform(8, 25)), b.color("drivable fallback", 8)))
    if b.chance("p_rail_track"):
        side = (-1, 1)[int(rng.integers(2))]
        outer = sides[(side + 1) // 2][2] + rng.uniform(2, 6)
        b.background.append(_Shape("rail track", b.strip(side * outer, side * (outer + 2.5), 3.0),
                                   b.color("non-drivable fallback", 8, 0.7)))
    return sides


def _add_roadside(b: _SceneBuilder, sides: list[tuple[float, float, float]]) -> None:
    rng = b.rng
    for i, side in enumerate((-1, 1)):
        roadside, outer, line = sides[i]
        if b.chance("p_buildings"):
            z = rng.uniform(2, 15)
            while z < 180:
                length = rng.uniform(8, 30)
                if rng.random() < 0.15 and b.style.environment != "highway":
                    color = b.color("wall", 12)
                    wall_height = rng.uniform(1.8, 3.2)
                    for z0, z1 in _segments(z, z + length):
                        b.add(z0, [_Shape("wall", b.hull(b.box(side * line, side * (line + 0.3), 0, wall_height,
                                                                z0, z1)), color)])
                else:
                    color = b.color("building", 18, shade=rng.uniform(0.7, 1.3))
                    rural = b.style.environment == "rural"
                    top = rng.uniform(3, 6) if rural else rng.uniform(5, 25)
                    depth = rng.uniform(6, 15)
                    for z0, z1 in _segments(z, z + length):
                        b.add(z0, [_Shape("building", b.hull(b.box(side * line, side * (line + depth), 0, top,
                                                                    z0, z1)), color)])
                z += length + (rng.uniform(0, 3) if b.style.environment == "urban" else rng.uniform(5, 40))
        if b.chance("p_wall"):
            z = rng.uniform(4, 30)
            color, top = b.color("wall", 12), rng.uniform(1.5, 3.0)
            for z0, z1 in _segments(z, z + rng.uniform(10, 60)):
                b.add(z0, [_Shape("wall", b.hull(b.box(side * (line - 0.3), side * line, 0, top, z0, z1)), color)])
    if b.chance("p_fence"):
        i = int(rng.integers(2))
        side, lat = (-1, 1)[i], sides[i][1] + 0.2
        z = rng.uniform(6, 20)
        color, top = b.color("fence", 10), rng.uniform(1.0, 1.8)
        for z0, z1 in _segments(z, z + rng.uniform(10, 40)):
            b.add(z0, [_Shape("fence", b.band(side * lat, 0.0, top, z0, z1), color)])
    if b.chance("p_guard_rail"):
        for i in [j for j in range(2) if rng.random() < 0.7] or [int(rng.integers(2))]:
            side, lat = (-1, 1)[i], sides[i][0] + 0.4
            color = b.color("guard rail", 8)
            for z0, z1 in _segments(3.0, 150.0):
                shapes = [_Shape("guard rail", b.band(side * lat, 0.35, 0.8, z0, z1), color)]
                if z0 < 40:
                    shapes.append(_Shape("guard rail", b.hull(b.box(side * lat, side * (lat + 0.12), 0, 0.8, z0,
                                                                     z0 + 0.12)), color))
                b.add(z0, shapes)
    if b.style.median == "obs-str-bar-fallback":
        color = b.color("obs-str-bar-fallback", 8)
        for z0, z1 in _segments(3.0, 250.0):
            b.add(z0, [_Shape("obs-str-bar-fallback", b.hull(b.box(-0.25, 0.25, 0, 0.8, z0, z1)), color)])
    for _ in range(b.count("trees")):
        i = int(rng.integers(2))
        side = (-1, 1)[i]
        lat = side * (sides[i][1] + rng.uniform(-0.5, 8.0))
        z = b.log_depth(5, 150)
        radius = rng.uniform(1.2, 4.0)
        trunk = rng.uniform(1.5, 4.0) if rng.random() < 0.75 else 0.0
        angles = np.linspace(0, 2 * np.pi, 13)[:-1]
        radii = radius * rng.uniform(0.75, 1.15, 12)
        crown = np.stack([radii * np.cos(angles) / 2, 0.5 + radii * np.sin(angles) / (2 * radius)], axis=1)
        shapes = []
        if trunk > 0:
            shapes.append(_Shape("vegetation", b.hull(b.box(lat - 0.15, lat + 0.15, 0, trunk + radius * 0.5, z,
                                                             z + 0.3)), b.color("vegetation", 8, 0.55)))
        shapes.append(_Shape("vegetation", b.facing(crown, lat, max(trunk - radius * 0.3, 0.0), z, 2.0,
                                                    2 * radius), b.color("vegetation", 14)))
        b.add(z - radius / 2, shapes)


def _pole(b: _SceneBuilder, lat: float, z: float, top: float, thickness: float, label: str = "pole") -> _Shape:
    return _Shape(label, b.hull(b.box(lat - thickness / 2, lat + thickness / 2, 0, top, z, z + thickness)),
                  b.color("pole", 10))


def _add_street_furniture(b: _SceneBuilder, sides: list[tuple[float, float, float]]) -> None:
    rng = b.rng

    def kerb(i: int, offset: float = 0.3) -> float:
        return (-1, 1)[i] * (sides[i][0] + offset)

    for _ in range(b.count("poles")):
        i = int(rng.integers(2))
        lat, z, top = kerb(i, rng.uniform(0.2, 0.8)), b.log_depth(6, 90), rng.uniform(6, 10)
        shapes = [_pole(b, lat, z, top, rng.uniform(0.18, 0.3))]
        if rng.random() < 0.5:
            reach = -np.sign(lat) * rng.uniform(1.5, 3.0)
            shapes.append(_Shape("pole", b.hull(b.box(lat, lat + reach, top - 0.3, top - 0.15, z, z + 0.15)),
                                 b.color("pole", 10)))
            lamp = b.facing(RECTANGLE_OUTLINE, lat + reach * 0.9, top - 0.35, z, 0.5, 0.1)
            shapes.append(_Shape(None, lamp, (255, 235, 180) if b.lit else (200, 200, 190), emissive=b.lit))
        b.add(z, shapes)
    if b.chance("p_polegroup"):
        i = int(rng.integers(2))
        lat, z = kerb(i, 0.5), b.log_depth(8, 40)
        boxes = [b.box(lat + dx - 0.1, lat + dx + 0.1, 0, rng.uniform(5, 9), z + dz, z + dz + 0.2)
                 for dx, dz in zip(rng.uniform(-0.6, 0.6, 3), rng.uniform(0, 1.5, 3), strict=True)]
        b.add(z, [_Shape("polegroup", b.hull(*boxes), b.color("pole", 10))])
    for _ in range(b.count("signs")):
        i = int(rng.integers(2))
        lat, z = kerb(i, rng.uniform(0.2, 1.0)), b.log_depth(6, 60)
        size, top = rng.uniform(0.6, 1.0), rng.uniform(2.2, 3.2)
        outline = SIGN_OUTLINES[int(rng.integers(len(SIGN_OUTLINES)))]
        b.add(z, [
            _pole(b, lat, z, top, 0.08),
            _Shape("traffic sign", b.facing(outline, lat, top - size * 0.4, z - 0.05, size, size),
                   b.color("traffic sign", 18)),
            _Shape(None, b.facing(outline * [0.6, 0.6] + [0, 0.2], lat, top - size * 0.4, z - 0.05, size, size),
                   (235, 235, 230) if rng.random() < 0.5 else (40, 60, 150)),
        ])
    if b.chance("p_gantry"):
        z, half = b.log_depth(20, 80), sides[0][0] + 0.5
        b.add(z, [
            _pole(b, -half, z, 7.0, 0.35),
            _pole(b, half, z, 7.0, 0.35),
            _Shape("pole", b.hull(b.box(-half, half, 6.6, 7.0, z, z + 0.3)), b.color("pole", 10)),
            _Shape("traffic sign", b.facing(RECTANGLE_OUTLINE, rng.uniform(-2, 2), 4.6, z - 0.1, rng.uniform(5, 9),
                                            2.2), b.color("traffic sign", 12, 0.6)),
        ])
    if b.chance("p_traffic_light"):
        i = int(rng.integers(2))
        lat, z, top = kerb(i, 0.5), b.log_depth(10, 35), rng.uniform(4.0, 6.0)
        shapes = [_pole(b, lat, z, top, 0.2)]
        head = lat
        if rng.random() < 0.5:
            head = lat - np.sign(lat) * rng.uniform(3, 6)
            shapes.append(_Shape("pole", b.hull(b.box(lat, head, top - 0.2, top, z, z + 0.2)), b.color("pole", 10)))
        head_bottom = top - 1.2
        shapes.append(_Shape("traffic light", b.facing(RECTANGLE_OUTLINE, head, head_bottom, z - 0.2, 0.38, 1.0),
                             b.color("traffic light", 10)))
        lit_lamp = int(rng.integers(3))
        lamp_colors = ((255, 40, 30), (255, 190, 30), (40, 255, 120))
        for k, color in enumerate(lamp_colors):
            lamp = b.facing(CIRCLE_OUTLINE, head, head_bottom + 0.08 + 0.3 * (2 - k), z - 0.25, 0.22, 0.22)
            shapes.append(_Shape(None, lamp, color if k == lit_lamp else (35, 35, 30), emissive=k == lit_lamp))
        b.add(z, shapes)
    for _ in range(b.count("billboards")):
        i = int(rng.integers(2))
        side = (-1, 1)[i]
        lat, z = side * (sides[i][2] + rng.uniform(0, 3)), b.log_depth(12, 90)
        width, tall, bottom = rng.uniform(4, 9), rng.uniform(2, 4), rng.uniform(3, 7)
        shapes = [_pole(b, lat - width * 0.3, z + 0.1, bottom, 0.3), _pole(b, lat + width * 0.3, z + 0.1, bottom, 0.3),
                  _Shape("billboard", b.facing(RECTANGLE_OUTLINE, lat, bottom, z, width, tall),
                         b.color("billboard", 25))]
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, w, h = rng.uniform(-0.3, 0.3), rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.4)
            panel = RECTANGLE_OUTLINE * [w, h] + [cx, cy]
            shapes.append(_Shape(None, b.facing(panel, lat, bottom, z - 0.01, width, tall),
                                 tuple(int(v) for v in rng.integers(30, 255, 3))))
        b.add(z, shapes)
    for _ in range(b.count("barricades")):
        i = int(rng.integers(2))
        lat, z = kerb(i, -rng.uniform(0.5, 1.5)), b.log_depth(6, 50)
        width = rng.uniform(1.2, 2.5)
        b.add(z, [
            _Shape("obs-str-bar-fallback", b.facing(BARRICADE_OUTLINE, lat, 0, z, width, 1.0),
                   b.color("obs-str-bar-fallback", 10)),
            _Shape(None, b.facing(RECTANGLE_OUTLINE * [0.9, 0.2] + [0, 0.7], lat, 0, z - 0.01, width, 1.0),
                   (210, 40, 40)),
        ])
    if b.chance("p_bridge"):
        z = rng.uniform(25, 90)
        deck, bottom = rng.uniform(1.2, 2.2), rng.uniform(5.0, 6.5)
        color = b.color("bridge", 12)
        for side in (-1, 1):
            lat = side * (sides[0][0] + 1.0)
            b.add(z + 4, [_Shape("bridge", b.hull(b.box(lat - 0.6, lat + 0.6, 0, bottom, z + 4, z + 5.2)), color)])
        b.add(z, [_Shape("bridge", b.hull(b.box(-300, 300, bottom, bottom + deck, z, z + 10)), color)])


VEHICLE_SIZES = {
    # width, height, length (metres); the upper box is the cabin / canopy / cargo as fractions of the body.
    "car": ((1.6, 1.85), (1.4, 1.6), (3.8, 4.6)),
    "autorickshaw": ((1.3, 1.45), (1.65, 1.8), (2.6, 2.9)),
    "truck": ((2.3, 2.5), (2.8, 3.4), (6.0, 9.0)),
    "bus": ((2.5, 2.6), (3.0, 3.3), (10.0, 12.0)),
    "motorcycle": ((0.6, 0.8), (1.05, 1.2), (1.8, 2.1)),
    "bicycle": ((0.45, 0.55), (0.95, 1.05), (1.6, 1.8)),
    "vehicle fallback": ((1.6, 2.2), (1.6, 2.4), (3.0, 4.5)),
}
VEHICLE_CABINS = {
    # lower-box height share, cabin width share, cabin start and end along the length
    "car": (0.55, 0.8, 0.25, 0.8),
    "autorickshaw": (0.5, 0.92, 0.0, 0.7),
    "truck": (0.35, 1.0, 0.0, 1.0),
    "bus": (0.3, 1.0, 0.0, 1.0),
    "motorcycle": (0.55, 0.5, 0.3, 0.7),
    "bicycle": (0.6, 0.3, 0.2, 0.8),
    "vehicle fallback": (0.5, 0.8, 0.1, 0.9),
}


def _vehicle_boxes(b: _SceneBuilder, kind: str, lat: float, z: float, size: tuple[float, float, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    width, height, length = size
    lower, cabin_width, start, end = VEHICLE_CABINS[kind]
    body = b.box(lat - width / 2, lat + width / 2, 0.0, height * lower, z, z + length)
    cabin = b.box(lat - width * cabin_width / 2, lat + width * cabin_width / 2, height * lower, height,
                  z + length * start, z + length * end)
    return body, cabin


def _add_vehicle(b: _SceneBuilder, kind: str, lat: float, z: float, label: str | None = None) -> None:
    rng = b.rng
    size = tuple(rng.uniform(*bounds) for bounds in VEHICLE_SIZES[kind])
    width, height, length = size
    lower, cabin_width, start, _ = VEHICLE_CABINS[kind]
    body, cabin = _vehicle_boxes(b, kind, lat, z, size)
    jitter = 35.0 if kind in ("car", "truck", "vehicle fallback") else 15.0
    shapes = [_Shape(label or kind, b.hull(body, cabin), b.color(kind, jitter, shade=rng.uniform(0.7, 1.3)))]
    if kind in ("car", "autorickshaw", "bus", "truck"):
        glass = RECTANGLE_OUTLINE * [0.85, 0.7] + [0, 0.15]
        glass_z = z + length * start if kind != "truck" else z + 0.4
        glass_color = (25, 25, 30) if kind == "autorickshaw" else (60, 70, 85)
        shapes.append(_Shape(None, b.facing(glass, lat, height * lower, glass_z, width * cabin_width,
                                            height * (1 - lower)), glass_color))
        for side in (-1, 1):
            tail = b.facing(RECTANGLE_OUTLINE, lat + side * width * 0.4, height * lower * 0.55, z - 0.01,
                            width * 0.12, height * lower * 0.25)
            shapes.append(_Shape(None, tail, (230, 30, 25) if b.lit else (150, 30, 30), emissive=b.lit))
        if z < 20 and kind != "bus":
            plate = b.facing(RECTANGLE_OUTLINE, lat, height * lower * 0.3, z - 0.02, 0.5, 0.13)
            shapes.append(_Shape("license plate", plate, b.color("license plate", 6)))
    if kind in ("motorcycle", "bicycle") and rng.random() < 0.9:
        rider = b.facing(RIDER_OUTLINE, lat, 0.3, z + length * 0.45, rng.uniform(0.45, 0.55), rng.uniform(1.35, 1.5))
        shapes.append(_Shape("rider", rider, b.color("rider", 35)))
    b.add(z, shapes)


def _add_traffic(b: _SceneBuilder, sides: list[tuple[float, float, float]]) -> None:
    rng, half = b.rng, b.style.road_half_width

    def lane_position(margin: float) -> float:
        while True:
            lat = rng.uniform(-half + margin, half - margin)
            if b.style.median == "none" or abs(lat) > 0.6 + margin:
                return lat

    counts = [("car", b.count("cars")), ("autorickshaw", b.count("autorickshaws")),
              ("motorcycle", b.count("motorcycles")), ("truck", b.count("trucks")),
              ("vehicle fallback", b.count("vehicle_fallbacks")), ("bus", int(b.chance("p_bus"))),
              ("bicycle", int(b.chance("p_bicycle")))]
    for kind, count in counts:
        for _ in range(count):
            margin = VEHICLE_SIZES[kind][0][1] / 2 + 0.1
            near = 5.0 if kind not in ("bus", "bicycle") else 8.0
            far = 90.0 if kind not in ("bus", "bicycle") else 45.0
            label = None
            if kind == "vehicle fallback":
                label = str(rng.choice(["vehicle fallback", "trailer", "caravan"], p=[0.7, 0.15, 0.15]))
            _add_vehicle(b, kind, lane_position(margin), b.log_depth(near, far), label)
    for _ in range(b.count("persons")):
        i = int(rng.integers(2))
        side = (-1, 1)[i]
        if rng.random() < 0.25:
            lat = rng.uniform(-half, half)
        else:
            lat = side * rng.uniform(sides[i][0] - 0.5, max(sides[i][1], sides[i][0] + 1.5))
        z, tall = b.log_depth(4, 60), rng.uniform(1.5, 1.8)
        b.add(z, [_Shape("person", b.facing(PERSON_OUTLINE, lat, 0, z, tall * 0.45, tall), b.color("person", 35))])
    for _ in range(b.count("animals")):
        lat, z = rng.uniform(-half, half + 2), b.log_depth(6, 50)
        b.add(z, [_Shape("animal", b.facing(ANIMAL_OUTLINE, lat, 0, z, 1.8, 1.4), b.color("person", 20, 1.3))])
    if b.chance("p_cargroup"):
        z, side = rng.uniform(50, 130), (-1, 1)[int(rng.integers(2))]
        boxes = []
        for k in range(int(rng.integers(3, 6))):
            size = tuple(float(np.mean(bounds)) for bounds in VEHICLE_SIZES["car"])
            boxes.extend(_vehicle_boxes(b, "car", side * (half - 1 - 2 * k), z + rng.uniform(0, 3), size))
        b.add(z, [_Shape("cargroup", b.hull(*boxes), b.color("car", 25))])
    if b.chance("p_persongroup"):
        i = int(rng.integers(2))
        z, lat = rng.uniform(20, 60), (-1, 1)[i] * (sides[i][0] + 1.0)
        outlines = [b.facing(PERSON_OUTLINE, lat + 0.6 * k, 0, z + rng.uniform(0, 1), 0.75, rng.uniform(1.5, 1.8))
                    for k in range(int(rng.integers(3, 6)))]
        b.add(z, [_Shape("persongroup", b.hull(*outlines), b.color("person", 25))])


def _add_annotation_quirks(b: _SceneBuilder) -> None:
    # IDD JSONs hold deleted polygons and degenerate ones; rasterize_polygons must skip both.
    rng, half = b.rng, b.style.road_half_width
    if b.chance("p_deleted"):
        lat, z = rng.uniform(-half, half), b.log_depth(8, 40)
        b.annotation_only.append(_Shape("car", b.hull(b.box(lat - 0.9, lat + 0.9, 0, 1.5, z, z + 4)), (0, 0, 0),
                                        deleted=1))
    if b.chance("p_degenerate"):
        b.annotation_only.append(_Shape("pole", b.cam.project([0.0, 0.0], [0.0, 5.0], [20.0, 20.0]), (0, 0, 0)))


def _add_ego_vehicle(b: _SceneBuilder) -> None:
    width, height, hood = b.cam.width, b.cam.height, b.style.ego_hood
    xs = np.linspace(0, 1, 9)
    rise = hood * (1 - 0.45 * (2 * xs - 1) ** 2)
    outline = np.concatenate([np.stack([xs * width, height * (1 - rise)], axis=1),
                              [(width, height), (0, height)]])
    b.foreground.append(_Shape("ego vehicle", outline, b.color("ego vehicle", 4)))


def _build_scene(style: SequenceStyle, image_size: tuple[int, int], rng: np.random.Generator
                ) -> tuple[list[_Shape], float, Lighting]:
    height, width = image_size
    camera = _Camera(
        width=width,
        height=height,
        horizon=style.horizon + rng.uniform(-0.01, 0.01),
        vanish_x=style.vanish_x + rng.uniform(-0.02, 0.02),
        bend=style.bend + rng.uniform(-1e-4, 1e-4),
        lateral=style.camera_lateral + rng.uniform(-0.3, 0.3),
    )
    preset = LIGHTING_PRESETS[style.lighting]
    gain = preset.gain * rng.uniform(0.92, 1.08)
    tint = tuple(t * w for t, w in zip(preset.tint, style.white_balance, strict=True))
    lighting = preset._replace(gain=gain, tint=tint)
    builder = _SceneBuilder(style, camera, rng, lighting)
    _add_sky_and_ground(builder)
    sides = _add_road(builder)
    _add_roadside(builder, sides)
    _add_street_furniture(builder, sides)
    _add_traffic(builder, sides)
    _add_annotation_quirks(builder)
    if style.ego_hood > 0:
        _add_ego_vehicle(builder)
    return builder.ordered_shapes(), camera.horizon * height, lighting


def _finalise(shapes: list[_Shape], image_size: tuple[int, int]) -> tuple[dict[str, Any], list[_Shape]]:
    """Clip and round every polygon; returns the IDD annotation and the shapes to paint, in the same order."""
    height, width = image_size
    objects, painted = [], []
    for shape in shapes:
        if len(shape.points) >= 3:
            points = np.round(_clip_polygon(shape.points, width - 1, height - 1), 1)
            if len(points) < 3:
                continue
        else:
            points = np.round(np.clip(shape.points, 0, [width - 1, height - 1]), 1)
        final = _Shape(shape.label, points, shape.color, shape.emissive, shape.deleted)
        if shape.label is not None:
            objects.append({"date": "", "deleted": shape.deleted, "draw": True, "id": len(objects),
                            "label": shape.label, "polygon": points.tolist(), "user": "roadseg-synthetic",
                            "verified": 0})
        if not shape.deleted and len(points) >= 3:
            painted.append(final)
    return {"imgHeight": height, "imgWidth": width, "objects": objects}, painted


def _paint(shapes: list[_Shape], image_size: tuple[int, int], saturation: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat-colour the shapes in order (desaturated per shape, lamps excepted); also returns where lamps show."""
    height, width = image_size
    canvas = Image.new("RGB", (width, height))
    glow = Image.new("L", (width, height), 0)
    draw, draw_glow = ImageDraw.Draw(canvas), ImageDraw.Draw(glow)
    glowing = False
    for shape in shapes:
        points = [tuple(p) for p in shape.points.tolist()]
        color = shape.color
        if saturation != 1.0 and not shape.emissive:
            gray = sum(color) / 3
            color = tuple(int(round(gray + (c - gray) * saturation)) for c in color)
        draw.polygon(points, fill=color)
        glowing = glowing or shape.emissive
        if glowing:
            draw_glow.polygon(points, fill=255 if shape.emissive else 0)
    return np.asarray(canvas), np.asarray(glow) > 0


def _shade(base: np.ndarray, emissive: np.ndarray, labels: np.ndarray, horizon_row: float, lighting: Lighting,
           rng: np.random.Generator) -> np.ndarray:
    """Texture, haze and light a flat-coloured frame; emissive pixels (lamps) keep their colour."""
    height, width = labels.shape
    scale = width / 640.0
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    # Class patterns are built as one (H, W) gain and one (H, W) offset so the RGB array is touched only a few times.
    coarse = rng.random((6, 10), dtype=np.float32)
    blotch = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)) - 0.5
    gain = 1.0 + 1.6 * _BLOTCH_TABLE[labels] * blotch
    grain = rng.standard_normal((height, width), dtype=np.float32)
    cell = max(2, round(5 * scale))
    offset = rng.integers(0, 3 * cell, 2)
    windows = ((cols + offset[0]) // cell % 3 != 2) & ((rows + offset[1]) // cell % 3 == 1)
    gain[(labels == LEVEL3_NAMES.index("building")) & windows] *= 0.55
    stripes = (cols // max(2, round(4 * scale))) % 2 == 0
    gain[(labels == LEVEL3_NAMES.index("fence")) & stripes] *= 0.6
    gain[(labels == LEVEL3_NAMES.index("curb")) & stripes] *= 0.3
    leaves = labels == LEVEL3_NAMES.index("vegetation")
    gain[leaves] *= 1.0 + 0.3 * np.roll(grain, 7, axis=1)[leaves]
    sky = labels == LEVEL3_NAMES.index("sky")
    sky_gradient = 0.8 + 0.35 * np.clip(rows / max(horizon_row, 1.0), 0, 1)
    gain[sky] *= np.broadcast_to(sky_gradient, gain.shape)[sky]
    haze = lighting.haze * np.exp(-np.abs(rows - horizon_row) / (0.12 * height))
    light = lighting.gain * np.array(lighting.tint, np.float32)
    image = base * (gain * (1 - haze))[..., None]
    image += ((_GRAIN_TABLE[labels] * grain) * (1 - haze))[..., None]
    image += haze[..., None] * np.array(lighting.sky, np.float32)
    image *= light
    image[emissive] = base[emissive]
    image += (rng.standard_normal((height, width), dtype=np.float32) * lighting.noise)[..., None]
    return (np.clip(image, 0, 255) + 0.5).astype(np.uint8)


def _label_suffixes(domain: str) -> tuple[str, ...]:
    # The source domain has no IDD polygons: its labels are Cityscapes train ids, which IDD names cannot express.
    return (LABEL_SUFFIX, POLYGONS_SUFFIX) if domain == IDD_DOMAIN else (SOURCE_LABEL_SUFFIX,)


def _frame_paths(output_dir: Path, split: str, sequence: str, frame: str, domain: str = IDD_DOMAIN) -> list[Path]:
    image_dir = output_dir / "leftImg8bit" / split / sequence
    label_dir = output_dir / "gtFine" / split / sequence
    return [image_dir / f"{frame}{IMAGE_SUFFIX}"] + [label_dir / f"{frame}{suffix}" for suffix in
                                                     _label_suffixes(domain)]


def _render_frame(job: _FrameJob) -> SyntheticFrame:
    geometry_seed, texture_seed = np.random.SeedSequence(job.seed, spawn_key=(job.split_code, 1, job.index)).spawn(2)
    shapes, horizon_row, lighting = _build_scene(job.style, job.image_size, np.random.default_rng(geometry_seed))
    annotation, painted = _finalise(shapes, job.image_size)
    domain = job.style.domain
    image_path, label_path, *polygons = _frame_paths(Path(job.output_dir), job.split, job.sequence, job.frame, domain)
    labels = rasterize_polygons(annotation, level=3, source=str(label_path))
    base, emissive = _paint(painted, job.image_size, lighting.saturation)
    image = _shade(base, emissive, labels, horizon_row, lighting, np.random.default_rng(texture_seed))
    if domain == SOURCE_DOMAIN:
        labels = _CITYSCAPES_TABLE[labels]
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    # The image goes last: a frame whose image exists always has its annotation and label map.
    for polygons_path in polygons:
        write_text_atomically(polygons_path, json.dumps(annotation))
    write_atomically(label_path, lambda stream: Image.fromarray(labels).save(stream, format="PNG"))
    write_atomically(image_path, lambda stream: Image.fromarray(image).save(stream, format="PNG", compress_level=1))
    present = np.flatnonzero(pixel_counts(labels)[:IGNORE_INDEX])
    return SyntheticFrame(job.sequence, job.frame, image_path, label_path, polygons[0] if polygons else None,
                          tuple(int(c) for c in present))


def sequence_sizes(num_images: int, num_sequences: int, rng: np.random.Generator) -> list[int]:
    """Split ``num_images`` into ``num_sequences`` uneven sizes (weights spread about 1:5), each at least 1."""
    if num_sequences < 1 or num_images < num_sequences:
        raise ValueError(f"need 1 <= num_sequences <= num_images, got {num_sequences} sequences for "
                         f"{num_images} images")
    weights = np.linspace(1.0, 5.0, num_sequences) * rng.uniform(0.85, 1.15, num_sequences)
    rng.shuffle(weights)
    shares = weights / weights.sum() * (num_images - num_sequences)
    sizes = np.floor(shares).astype(int)
    leftover = num_images - num_sequences - int(sizes.sum())
    sizes[np.argsort(-(shares - sizes), kind="stable")[:leftover]] += 1
    return [int(size) + 1 for size in sizes]


def _default_workers(num_images: int) -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Starting a pool costs more than rendering a handful of frames.
    return max(1, min(available, num_images // 16))


def _check_no_foreign_frames(output_dir: Path, split: str, expected: set[Path]) -> None:
    foreign = []
    written = [("leftImg8bit", IMAGE_SUFFIX)] + [("gtFine", suffix) for domain in DOMAINS
                                                for suffix in _label_suffixes(domain)]
    for folder, suffix in written:
        root = output_dir / folder / split
        if root.is_dir():
            foreign.extend(path for path in root.glob(f"*/*{suffix}") if path not in expected)
    if foreign:
        raise FileExistsError(
            f"{output_dir}: {len(foreign)} frame files from another run under split {split!r} "
            f"(e.g. {sorted(foreign)[0]}); they would mix with this one, so use an empty --output_dir or delete them"
        )


def generate_synthetic_idd(
    output_dir: str | Path,
    num_images: int = 300,
    num_sequences: int = 12,
    image_size: tuple[int, int] | str = (360, 640),
    seed: int = 0,
    split: str = "train",
    workers: int | None = None,
    domain: str = IDD_DOMAIN,
) -> list[SyntheticFrame]:
    """Write ``num_images`` synthetic IDD frames (image, level-3 label PNG, polygons JSON) under ``output_dir``.

    ``image_size`` is ``(height, width)`` or a ``"HxW"`` string. Each frame depends only on (seed, split, frame
    index), so the files are the same for any number of workers, and a val split made with the same seed differs
    from the train split. ``domain="cityscapes"`` writes the source domain instead (image and Cityscapes train-id
    PNG per frame, plus ``id2label.json``).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    height, width = parse_size(image_size) if isinstance(image_size, str) else (int(v) for v in image_size)
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}, got {height}x{width}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", split):
        raise ValueError(f"split must be a plain folder name such as train or val, got {split!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    output_dir = Path(output_dir)
    split_code = zlib.crc32(split.encode())
    dataset_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_code, 2)))
    sizes = sequence_sizes(num_images, num_sequences, dataset_rng)
    source = domain == SOURCE_DOMAIN
    environments = _draw_covering(*((SOURCE_ENVIRONMENTS, SOURCE_ENVIRONMENT_WEIGHTS) if source else
                                    (ENVIRONMENTS, ENVIRONMENT_WEIGHTS)), num_sequences, dataset_rng)
    lightings = _draw_covering(*((SOURCE_LIGHTINGS, SOURCE_LIGHTING_WEIGHTS) if source else
                                 (LIGHTINGS, LIGHTING_WEIGHTS)), num_sequences, dataset_rng)
    make_style = _source_style if source else _sequence_style
    jobs = []
    for sequence_index, size in enumerate(sizes):
        style_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_code, 0, sequence_index)))
        style = make_style(environments[sequence_index], lightings[sequence_index], style_rng)
        for _ in range(size):
            index = len(jobs)
            jobs.append(_FrameJob(str(output_dir), split, str(sequence_index), f"{index:06d}", index, seed,
                                  split_code, (height, width), style))
    expected = {path for job in jobs for path in _frame_paths(output_dir, split, job.sequence, job.frame, domain)}
    _check_no_foreign_frames(output_dir, split, expected)
    if source:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output_dir / SOURCE_ID2LABEL_FILE,
                              json.dumps(dict(enumerate(CITYSCAPES_NAMES)), indent=1) + "\n")
    workers = workers or _default_workers(num_images)
    if workers == 1:
        return [_render_frame(job) for job in jobs]
    methods = multiprocessing.get_all_start_methods()
    # fork skips re-importing transformers in every worker; the workers only use numpy and PIL.
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers) as pool:
        return pool.map(_render_frame, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


@dataclass
class SyntheticArguments:
    """Command-line arguments of ``python -m roadseg_utils.synthetic``."""

    output_dir: str = field(metadata={"help": "Folder that receives leftImg8bit/ and gtFine/ in the IDD layout."})
    num_images: int = field(default=300, metadata={"help": "Number of frames to write."})
    num_sequences: int = field(default=12, metadata={"help": "Number of sequence folders (uneven sizes)."})
    image_size: str = field(default="360x640", metadata={"help": "Frame size as HEIGHTxWIDTH."})
    seed: int = field(default=0, metadata={"help": "Random seed; the same seed writes byte-identical files."})
    split: str = field(default="train", metadata={"help": "Split folder name (train, val, ...)."})
    workers: int | None = field(default=None, metadata={"help": "Worker processes (default: available cores)."})
    domain: str = field(
        default=IDD_DOMAIN,
        metadata={"help": "'idd': IDD-like scenes with level-3 labels; 'cityscapes': the pretraining source domain "
                  "(European look, Cityscapes' 19 train ids).", "choices": list(DOMAINS)},
    )


def main(argv: list[str] | None = None) -> list[SyntheticFrame]:
    """Parse arguments, write the synthetic dataset and print a short summary."""
    parser = HfArgumentParser(SyntheticArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        image_size = parse_size(args.image_size)
    except ValueError as err:
        parser.error(f"--image_size: {err}")
    start = time.perf_counter()
    try:
        frames = generate_synthetic_idd(args.output_dir, args.num_images, args.num_sequences, image_size, args.seed,
                                        args.split, args.workers, args.domain)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    elapsed = time.perf_counter() - start
    names = CITYSCAPES_NAMES if args.domain == SOURCE_DOMAIN else LEVEL3_NAMES
    images_per_class = np.zeros(len(names), dtype=int)
    for frame in frames:
        images_per_class[list(frame.classes)] += 1
    per_sequence: dict[str, int] = {}
    for frame in frames:
        per_sequence[frame.sequence] = per_sequence.get(frame.sequence, 0) + 1
    present = np.flatnonzero(images_per_class)
    rarest = sorted(present, key=lambda idx: images_per_class[idx])[:6]
    print(f"wrote {len(frames)} frames of {image_size[0]}x{image_size[1]} in {len(per_sequence)} sequences "
          f"(sizes {min(per_sequence.values())}-{max(per_sequence.values())}) to {args.output_dir} in {elapsed:.1f} s")
    print(f"classes present: {len(present)}/{len(names)}; rarest (share of images): "
          + ", ".join(f"{names[idx]} {images_per_class[idx] / len(frames):.1%}" for idx in rarest))
    return frames


if __name__ == "__main__":
    main(sys.argv[1:])
