"""Pictures of the pipeline: selection plots, and (evaluation) overlays, confusion matrix and per-class IoU charts.

Plots draw on `matplotlib.figure.Figure` directly (no pyplot), so they never touch a global backend or need a
display, and every PNG is written through a temporary file and a rename.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import write_atomically
from .labels import IGNORE_INDEX, LabelSet


def _save_selection_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Write a matplotlib figure as a PNG atomically."""
    return write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=100))


def _selection_bars(positions: np.ndarray, lengths: np.ndarray, thickness: float, color: str, label: str) -> Any:
    """Horizontal bars of one series as a single PolyCollection: one artist draws far faster than one per bar."""
    from matplotlib.collections import PolyCollection

    positions, lengths = np.asarray(positions, dtype=float), np.asarray(lengths, dtype=float)
    low, high, zero = positions - thickness / 2, positions + thickness / 2, np.zeros_like(lengths)
    corners = np.stack([np.stack([zero, lengths, lengths, zero], axis=-1),
                        np.stack([low, low, high, high], axis=-1)], axis=-1)
    return PolyCollection(corners, facecolors=color, edgecolors="none", label=label)


def plot_class_frequency(
    class_names: Sequence[str],
    pool_share: np.ndarray,
    subset_share: np.ndarray,
    rare_ids: Sequence[int],
    path: str | os.PathLike[str],
) -> Path:
    """Horizontal bars: share of images containing each class in the pool and in the subset; rare classes in red."""
    from matplotlib.figure import Figure

    count = len(class_names)
    positions = np.arange(count)
    height = 1.2 + 0.28 * count
    figure = Figure(figsize=(8, height))
    # Fixed margins: a layout engine would draw every figure twice.
    figure.subplots_adjust(left=0.3, right=0.97, top=1 - 0.45 / height, bottom=0.55 / height)
    axes = figure.add_subplot()
    axes.add_collection(_selection_bars(positions - 0.2, np.asarray(pool_share) * 100, 0.4, "#9aa5b1",
                                        "training pool"))
    axes.add_collection(_selection_bars(positions + 0.2, np.asarray(subset_share) * 100, 0.4, "#2f6db5", "selected"))
    axes.set_xlim(0, 100)
    axes.set_ylim(count - 0.5, -0.5)
    # Plain texts instead of y ticks: 26 tick objects cost more than the rest of the figure.
    axes.set_yticks([])
    rare = set(rare_ids)
    for index, name in enumerate(class_names):
        axes.text(-0.01, index, f"{index} {name}", transform=axes.get_yaxis_transform(), ha="right", va="center",
                  color="#c0392b" if index in rare else "black")
    axes.set_xlabel("images containing the class (%)")
    axes.set_title("Class image frequency before and after selection (rare classes in red)")
    axes.legend(loc="lower right")
    axes.grid(axis="x", alpha=0.3)
    return _save_selection_figure(figure, path)


def plot_score_distribution(
    scores: np.ndarray, selected: np.ndarray, path: str | os.PathLike[str], cutoff: float | None = None
) -> Path:
    """Histogram of the weighted score, selected images stacked on the rest, with the top-K cut-off if given."""
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    selected = np.asarray(selected, dtype=bool)
    low, high = float(scores.min()), float(scores.max())
    edges = np.linspace(low, high if high > low else low + 1e-9, 41)
    rest, _ = np.histogram(scores[~selected], edges)
    chosen, _ = np.histogram(scores[selected], edges)
    figure = Figure(figsize=(8, 4))
    figure.subplots_adjust(left=0.09, right=0.97, top=0.92, bottom=0.13)
    axes = figure.add_subplot()
    axes.stairs(rest, edges, fill=True, color="#9aa5b1", label=f"not selected ({int((~selected).sum())})")
    axes.stairs(rest + chosen, edges, baseline=rest, fill=True, color="#2f6db5",
                label=f"selected ({int(selected.sum())})")
    if cutoff is not None:
        axes.axvline(cutoff, color="#c0392b", linestyle="--", label=f"top-K cut-off {cutoff:.3f}")
    axes.set_xlabel("weighted score")
    axes.set_ylabel("images")
    axes.set_title("Score distribution of the training pool")
    axes.legend()
    return _save_selection_figure(figure, path)


# ---------------------------------------------------------------------------------------------------------
# Evaluation pictures (run_eval.py): overlays, confusion matrix, per-class IoU chart

OVERLAY_GAP = 4  # pixels between the three panels
OVERLAY_HEADER = 20  # pixels of the title strip above the panels
OVERLAY_TITLES = ("image", "ground truth", "prediction")
LEGEND_ROW = 18
LEGEND_CELL = 180
LEGEND_PAD = 6
IGNORE_COLOR = (0, 0, 0)


def _eval_font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def colorize_labels(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 picture of a label-id map through a (256, 3) palette (ignore = 255 stays black)."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map must be 2-D, got shape {label_map.shape}")
    return np.asarray(palette, dtype=np.uint8)[label_map.astype(np.uint8, copy=False)]


def _legend_entries(label_set: LabelSet, *maps: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    counts = sum(np.bincount(np.asarray(m, dtype=np.uint8).ravel(), minlength=256) for m in maps)
    entries = [(label_set.id2label[i], tuple(label_set.colors[i])) for i in range(label_set.num_labels) if counts[i]]
    if counts[IGNORE_INDEX]:
        entries.append(("ignore", IGNORE_COLOR))
    return entries


def render_overlay(
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    label_set: LabelSet,
    max_panel_width: int = 960,
) -> Image.Image:
    """Image | ground truth | prediction side by side in the label set's colours, with a legend of the classes shown.

    Panels keep the image's aspect ratio and are shrunk to ``max_panel_width`` when wider (label maps with nearest
    neighbours). Panel ``k`` starts at ``(OVERLAY_HEADER, k * (panel_width + OVERLAY_GAP))``.
    """
    image, label, prediction = np.asarray(image), np.asarray(label), np.asarray(prediction)
    if image.ndim != 3 or image.shape[2] != 3 or label.shape != image.shape[:2] or prediction.shape != label.shape:
        raise ValueError(
            f"expected an (H, W, 3) image with (H, W) label and prediction maps, got {image.shape}, "
            f"{label.shape} and {prediction.shape}"
        )
    height, width = label.shape
    scale = min(1.0, max_panel_width / width)
    panel_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    panels = [
        Image.fromarray(image.astype(np.uint8, copy=False)).resize(panel_size, Image.Resampling.BILINEAR),
        Image.fromarray(colorize_labels(label, label_set.palette)).resize(panel_size, Image.Resampling.NEAREST),
        Image.fromarray(colorize_labels(prediction, label_set.palette)).resize(panel_size, Image.Resampling.NEAREST),
    ]
    total_width = 3 * panel_size[0] + 2 * OVERLAY_GAP
    entries = _legend_entries(label_set, label, prediction)
    columns = max(1, total_width // LEGEND_CELL)
    rows = -(-len(entries) // columns)
    legend_height = rows * LEGEND_ROW + 2 * LEGEND_PAD
    canvas = Image.new("RGB", (total_width, OVERLAY_HEADER + panel_size[1] + legend_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _eval_font()
    for index, (panel, title) in enumerate(zip(panels, OVERLAY_TITLES, strict=True)):
        left = index * (panel_size[0] + OVERLAY_GAP)
        canvas.paste(panel, (left, OVERLAY_HEADER))
        draw.text((left + 4, 3), title, fill=(0, 0, 0), font=font)
    top = OVERLAY_HEADER + panel_size[1] + LEGEND_PAD
    swatch = LEGEND_ROW - 6
    for index, (name, color) in enumerate(entries):
        x = (index % columns) * LEGEND_CELL + LEGEND_PAD
        y = top + (index // columns) * LEGEND_ROW
        draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + 6, y + 1), name, fill=(0, 0, 0), font=font)
    return canvas


def confusion_matrix_figsize(num_labels: int) -> tuple[float, float]:
    """Figure size in inches of :func:`plot_confusion_matrix` for ``num_labels`` classes."""
    side = 3.0 + 0.32 * num_labels
    return side + 1.0, side


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], title: str | None = None, dpi: int = 100
) -> Any:
    """Row-normalised confusion matrix (true x predicted) with class names on both axes; empty rows are grey."""
    import matplotlib
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.float64)
    num_labels = len(class_names)
    if counts.shape != (num_labels, num_labels):
        raise ValueError(f"expected a ({num_labels}, {num_labels}) matrix for {num_labels} names, got {counts.shape}")
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.full_like(counts, np.nan)
    np.divide(counts, row_totals, out=shares, where=row_totals > 0)
    figure = Figure(figsize=confusion_matrix_figsize(num_labels), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad=(0.85, 0.85, 0.85))
    shown = axes.imshow(np.ma.masked_invalid(shares), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = np.arange(num_labels)
    axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, labels=class_names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("ground-truth class")
    if title:
        axes.set_title(title)
    if num_labels <= 40:
        rows, cols = np.nonzero(np.nan_to_num(shares) >= 0.005)
        for row, col in zip(rows, cols, strict=True):
            value = shares[row, col]
            axes.text(col, row, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=6,
                      color="white" if value > 0.6 else "black")
    figure.colorbar(shown, ax=axes, fraction=0.04, label="share of the ground-truth row")
    return figure


def iou_chart_figsize(num_labels: int) -> tuple[float, float]:
    """Figure size in inches of :func:`plot_per_class_iou` for ``num_labels`` classes."""
    return 8.0, 1.4 + 0.3 * num_labels


def plot_per_class_iou(
    iou: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    mean_iou: float | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Any:
    """Horizontal bars of per-class IoU in class colours, first class on top; NaN (absent class) is marked n/a."""
    from matplotlib.figure import Figure

    values = np.asarray(iou, dtype=np.float64)
    num_labels = len(class_names)
    if values.shape != (num_labels,) or len(colors) != num_labels:
        raise ValueError(f"expected {num_labels} IoU values and colours, got {values.shape} and {len(colors)}")
    figure = Figure(figsize=iou_chart_figsize(num_labels), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(num_labels)[::-1]
    axes.barh(positions, np.nan_to_num(values), color=np.asarray(colors) / 255.0, edgecolor="black", linewidth=0.4)
    for position, value in zip(positions, values, strict=True):
        text = "n/a" if np.isnan(value) else f"{value:.3f}"
        axes.text((0 if np.isnan(value) else value) + 0.01, position, text, va="center", fontsize=8)
    if mean_iou is not None and not np.isnan(mean_iou):
        axes.axvline(mean_iou, color="black", linestyle="--", linewidth=1, label=f"mean IoU {mean_iou:.3f}")
        axes.legend(loc="lower right", fontsize=8)
    axes.set_yticks(positions, labels=class_names, fontsize=8)
    axes.set_xlim(0.0, 1.12)
    axes.set_ylim(-0.7, num_labels - 0.3)
    axes.set_xlabel("IoU")
    if title:
        axes.set_title(title)
    return figure


def save_png_atomically(picture: Image.Image | Any, path: str | os.PathLike[str]) -> Path:
    """Write a PIL image or a matplotlib figure as PNG atomically (safe from several threads at once)."""
    if isinstance(picture, Image.Image):
        return write_atomically(path, lambda stream: picture.save(stream, format="PNG"))
    return write_atomically(path, lambda stream: picture.savefig(stream, format="png", dpi=picture.dpi))
