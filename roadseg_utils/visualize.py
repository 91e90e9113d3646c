"""Pictures of the pipeline: selection plots, and (evaluation) overlays, confusion matrix and per-class IoU charts.

The selection charts are drawn with PIL; the evaluation charts draw on `matplotlib.figure.Figure` directly (no
pyplot), so they never touch a global backend or need a display. Every PNG is written through a temporary file and
a rename.
"""

# Two plotting stacks, measured by benchmarks/bench_plots.py (figures in BENCHMARKS.md). On matplotlib, importing it
# and drawing the two selection plots would cost a cached selection rerun several times what the selection itself
# takes, and that command-line rerun has no margin under its 2 s target; in PIL they are a few bars and text. The
# evaluation charts (a heat map with a colour bar, labelled bars) stay on matplotlib, imported inside those functions
# only so that importing this module never loads it: next to running a model over a test split, they cost little.

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import write_atomically
from .labels import IGNORE_INDEX, LabelSet, pixel_counts

CHART_WIDTH = 800
CHART_MARGIN = 12
CHART_TITLE_HEIGHT = 28
CHART_AXIS_HEIGHT = 44
CHART_ROW_HEIGHT = 24
POOL_COLOR = (154, 165, 177)
SELECTED_COLOR = (47, 109, 181)
RARE_COLOR = (192, 57, 43)
GRID_COLOR = (225, 225, 225)
INK = (0, 0, 0)


def nice_ticks(low: float, high: float, target: int = 5) -> np.ndarray:
    """Round ticks (steps of 1, 2, 2.5 or 5 times a power of ten), the first <= low and the last >= high."""
    span = high - low if high > low else max(abs(high), 1.0)
    raw_step = span / max(target, 1)
    power = 10.0 ** np.floor(np.log10(raw_step))
    step = power * min(m for m in (1, 2, 2.5, 5, 10) if m * power >= raw_step)
    first, last = np.floor(low / step + 1e-9), np.ceil(high / step - 1e-9)
    # Adding 0.0 turns -0.0 into 0.0, so no tick reads "-0".
    return np.round(np.arange(first, last + 1) * step, 10) + 0.0


def _tick_label(value: float) -> str:
    return f"{value:g}"


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(text: str, font: Any) -> int:
    return round(font.getlength(text))


def _legend(draw: ImageDraw.ImageDraw, right: int, top: int, entries: Sequence[tuple[str, tuple[int, ...]]],
            font: Any) -> None:
    """Colour swatches and names, right-aligned at ``right``, one row each from ``top``."""
    width = max(_text_width(name, font) for name, _ in entries) + 24
    for row, (name, color) in enumerate(entries):
        y = top + row * 18
        draw.rectangle((right - width, y + 2, right - width + 12, y + 14), fill=color)
        draw.text((right - width + 18, y), name, fill=INK, font=font)


def _save_chart(canvas: Image.Image, path: str | os.PathLike[str]) -> Path:
    return write_atomically(path, lambda stream: canvas.save(stream, format="PNG"))


def plot_class_frequency(
    class_names: Sequence[str],
    pool_share: np.ndarray,
    subset_share: np.ndarray,
    rare_ids: Sequence[int],
    path: str | os.PathLike[str],
) -> Path:
    """Horizontal bars: share of images containing each class in the pool and in the subset; rare classes in red."""
    font = _font(13)
    labels = [f"{index} {name}" for index, name in enumerate(class_names)]
    left = CHART_MARGIN + max((_text_width(label, font) for label in labels), default=0) + 8
    right = CHART_WIDTH - CHART_MARGIN - 8
    top = CHART_TITLE_HEIGHT + 40
    bottom = top + CHART_ROW_HEIGHT * len(labels)
    canvas = Image.new("RGB", (CHART_WIDTH, bottom + CHART_AXIS_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((CHART_MARGIN, 6), "Class image frequency before and after selection (rare classes in red)",
              fill=INK, font=_font(15))
    _legend(draw, right, CHART_TITLE_HEIGHT, [("training pool", POOL_COLOR), ("selected", SELECTED_COLOR)], font)

    def x_of(percent: float) -> int:
        return left + round((right - left) * percent / 100)

    for tick in nice_ticks(0, 100):
        draw.line((x_of(tick), top, x_of(tick), bottom), fill=GRID_COLOR)
        label = _tick_label(tick)
        draw.text((x_of(tick) - _text_width(label, font) / 2, bottom + 4), label, fill=INK, font=font)
    rare = set(rare_ids)
    bar = (CHART_ROW_HEIGHT - 6) // 2
    for index, (label, pool, chosen) in enumerate(zip(labels, pool_share, subset_share, strict=True)):
        y = top + index * CHART_ROW_HEIGHT + 3
        for offset, share, color in ((0, pool, POOL_COLOR), (bar, chosen, SELECTED_COLOR)):
            if share > 0:
                draw.rectangle((left, y + offset, x_of(100 * float(share)) - 1, y + offset + bar - 1), fill=color)
        draw.text((left - 8 - _text_width(label, font), y + 1), label,
                  fill=RARE_COLOR if index in rare else INK, font=font)
    draw.line((left, top, left, bottom), fill=INK)
    draw.line((left, bottom, right, bottom), fill=INK)
    axis_label = "images containing the class (%)"
    draw.text(((left + right - _text_width(axis_label, font)) / 2, bottom + 22), axis_label, fill=INK, font=font)
    return _save_chart(canvas, path)


def plot_score_distribution(
    scores: np.ndarray, selected: np.ndarray, path: str | os.PathLike[str], cutoff: float | None = None
) -> Path:
    """Histogram of the weighted score, selected images stacked on the rest, with the top-K cut-off if given."""
    scores = np.asarray(scores, dtype=np.float64)
    selected = np.asarray(selected, dtype=bool)
    low, high = float(scores.min()), float(scores.max())
    edges = np.linspace(low, high if high > low else low + 1e-9, 41)
    rest, _ = np.histogram(scores[~selected], edges)
    chosen, _ = np.histogram(scores[selected], edges)
    font = _font(13)
    height = 400
    left, right, top, bottom = 64, CHART_WIDTH - CHART_MARGIN - 8, CHART_TITLE_HEIGHT + 24, height - CHART_AXIS_HEIGHT
    canvas = Image.new("RGB", (CHART_WIDTH, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((CHART_MARGIN, 6), "Score distribution of the training pool", fill=INK, font=_font(15))
    y_ticks = nice_ticks(0, max(int((rest + chosen).max()), 1))
    y_max = float(y_ticks[-1])

    def x_of(value: float) -> float:
        return left + (right - left) * (value - edges[0]) / (edges[-1] - edges[0])

    def y_of(count: float) -> float:
        return bottom - (bottom - top) * count / y_max

    for tick in y_ticks:
        draw.line((left, y_of(tick), right, y_of(tick)), fill=GRID_COLOR)
        label = _tick_label(tick)
        draw.text((left - 6 - _text_width(label, font), y_of(tick) - 8), label, fill=INK, font=font)
    for tick in nice_ticks(edges[0], edges[-1]):
        if edges[0] - 1e-12 <= tick <= edges[-1] + 1e-12:
            draw.line((x_of(tick), bottom, x_of(tick), bottom + 4), fill=INK)
            label = _tick_label(tick)
            draw.text((x_of(tick) - _text_width(label, font) / 2, bottom + 6), label, fill=INK, font=font)
    for start, stop, below, above in zip(edges[:-1], edges[1:], rest, chosen, strict=True):
        x0, x1 = x_of(start), x_of(stop) - 1
        if below:
            draw.rectangle((x0, y_of(below), x1, bottom), fill=POOL_COLOR)
        if above:
            draw.rectangle((x0, y_of(below + above), x1, y_of(below)), fill=SELECTED_COLOR)
    entries = [(f"not selected ({int((~selected).sum())})", POOL_COLOR), (f"selected ({int(selected.sum())})",
                                                                          SELECTED_COLOR)]
    if cutoff is not None:
        x = x_of(cutoff)
        for y in range(top, bottom, 8):
            draw.line((x, y, x, min(y + 4, bottom)), fill=RARE_COLOR, width=2)
        entries.append((f"top-K cut-off {cutoff:.3f}", RARE_COLOR))
    draw.line((left, top, left, bottom), fill=INK)
    draw.line((left, bottom, right, bottom), fill=INK)
    _legend(draw, right, top + 4, entries, font)
    axis_label = "weighted score"
    draw.text(((left + right - _text_width(axis_label, font)) / 2, bottom + 24), axis_label, fill=INK, font=font)
    draw.text((CHART_MARGIN, top - 20), "images", fill=INK, font=font)
    return _save_chart(canvas, path)


# ---------------------------------------------------------------------------------------------------------
# Evaluation pictures (run_eval.py): overlays, confusion matrix, per-class IoU chart

OVERLAY_GAP = 4  # pixels between the three panels
OVERLAY_HEADER = 20  # pixels of the title strip above the panels
OVERLAY_TITLES = ("image", "ground truth", "prediction")
LEGEND_ROW = 18
LEGEND_CELL = 180
LEGEND_PAD = 6
IGNORE_COLOR = (0, 0, 0)


def colorize_labels(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 picture of a label-id map through a (256, 3) palette (ignore = 255 stays black)."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map must be 2-D, got shape {label_map.shape}")
    return np.asarray(palette, dtype=np.uint8)[label_map.astype(np.uint8, copy=False)]


def _legend_entries(label_set: LabelSet, *maps: np.ndarray) -> list[tuple[str, tuple[int, int, int]]]:
    counts = sum(pixel_counts(np.asarray(m, dtype=np.uint8)) for m in maps)
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
    font = _font()
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


CELL_LABEL_MIN_SHARE = 0.005  # off-diagonal cells below this share of their row get no text (clutter)
NAME_CHARS_IN_BASE_SIZE = 24  # class names up to this long fit the base figure size; longer ones widen it
TITLE_WIDTH_SHARE = 0.94  # a title is wrapped to at most this share of the figure width


def format_row_shares(shares: np.ndarray | float) -> np.ndarray:
    """Row shares in [0, 1] as percent labels: '0' and '100' only when exact, else one decimal ('<0.1', '>99.9')."""
    values = np.asarray(shares, dtype=np.float64)
    if np.any((values < 0) | (values > 1)):  # NaN compares False, so empty rows pass
        raise ValueError(f"row shares must lie in [0, 1], got values from {np.nanmin(values)} to {np.nanmax(values)}")
    percent = np.round(100 * np.nan_to_num(values), 1)
    labels = np.char.mod("%.1f", percent).astype(object)
    # Rounding must not make a near-perfect cell read as perfect, nor a small confusion read as none.
    labels[(percent >= 100) & (values < 1)] = ">99.9"
    labels[(percent <= 0) & (values > 0)] = "<0.1"
    labels[values == 1] = "100"
    labels[values == 0] = "0"
    labels[np.isnan(values)] = ""
    return labels.astype(str)


def confusion_matrix_figsize(num_labels: int, longest_name: int = 0) -> tuple[float, float]:
    """Figure size in inches of :func:`plot_confusion_matrix` for ``num_labels`` classes and the longest name."""
    # Names label both axes, so a name longer than the base size allows widens and heightens the figure alike; the
    # 4-inch floor keeps the colour bar as tall as its label with one to three classes.
    side = max(4.0, 3.0 + 0.32 * num_labels) + 0.08 * max(0, longest_name - NAME_CHARS_IN_BASE_SIZE)
    return side + 1.0, side


def _set_fitting_title(figure: Any, title: str) -> None:
    """Set ``title`` as the figure's title, wrapped onto more lines where it is wider than the figure."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # A figure title is centred on the figure, so fitting its width fits it; an axes title is centred on the axes,
    # which the colour bar pushes off-centre.
    text = figure.suptitle(title)
    renderer = FigureCanvasAgg(figure).get_renderer()
    room = TITLE_WIDTH_SHARE * figure.bbox.width
    width = text.get_window_extent(renderer).width
    chars = len(title)
    # Each pass narrows the wrap width in proportion to the overshoot (glyph widths vary, hence the loop).
    while width > room and chars > 8:
        chars = max(8, min(chars - 1, int(chars * room / width)))
        text.set_text("\n".join(textwrap.wrap(title, chars, break_on_hyphens=False)))
        width = text.get_window_extent(renderer).width


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], title: str | None = None, dpi: int = 100
) -> Any:
    """Row-normalised confusion matrix (true x predicted, cells in % of the row); empty rows are grey."""
    import matplotlib
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.float64)
    num_labels = len(class_names)
    if counts.shape != (num_labels, num_labels):
        raise ValueError(f"expected a ({num_labels}, {num_labels}) matrix for {num_labels} names, got {counts.shape}")
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.full_like(counts, np.nan)
    np.divide(counts, row_totals, out=shares, where=row_totals > 0)
    longest_name = max((len(name) for name in class_names), default=0)
    figure = Figure(figsize=confusion_matrix_figsize(num_labels, longest_name), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad=(0.85, 0.85, 0.85))
    # aspect="auto": with a fixed aspect and a colour bar, constrained layout can leave the y-axis title outside
    # the figure (26 IDD classes did); the figure size keeps the cells close to square instead.
    shown = axes.imshow(np.ma.masked_invalid(100 * shares), cmap=cmap, vmin=0.0, vmax=100.0, interpolation="nearest",
                        aspect="auto")
    ticks = np.arange(num_labels)
    axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, labels=class_names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("ground-truth class")
    if title:
        _set_fitting_title(figure, title)
    if num_labels <= 40:
        # The diagonal of every non-empty row is labelled, so a class never predicted right reads "0".
        diagonal = np.eye(num_labels, dtype=bool) & ~np.isnan(shares)
        labelled = (np.nan_to_num(shares) >= CELL_LABEL_MIN_SHARE) | diagonal
        rows, cols = np.nonzero(labelled)
        for row, col, label in zip(rows, cols, format_row_shares(shares[rows, cols]), strict=True):
            axes.text(col, row, label, ha="center", va="center", fontsize=6,
                      color="white" if shares[row, col] > 0.6 else "black")
    figure.colorbar(shown, ax=axes, fraction=0.04, label="% of the ground-truth row")
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
        _set_fitting_title(figure, title)
    return figure


def save_png_atomically(picture: Image.Image | Any, path: str | os.PathLike[str]) -> Path:
    """Write a PIL image or a matplotlib figure as PNG atomically (safe from several threads at once)."""
    if isinstance(picture, Image.Image):
        return write_atomically(path, lambda stream: picture.save(stream, format="PNG"))
    return write_atomically(path, lambda stream: picture.savefig(stream, format="png", dpi=picture.dpi))


def save_score_charts(
    confusion: np.ndarray,
    metrics: Mapping[str, Any],
    label_set: LabelSet,
    title: str,
    confusion_path: str | os.PathLike[str],
    iou_path: str | os.PathLike[str],
) -> list[Path]:
    """The confusion-matrix and per-class IoU PNGs of one scored split (``metrics`` of the same matrix)."""
    names = [label_set.id2label[index] for index in range(label_set.num_labels)]
    colors = [tuple(label_set.colors[index]) for index in range(label_set.num_labels)]
    chart = plot_per_class_iou(metrics["per_category_iou"], names, colors, metrics["mean_iou"], title=title)
    return [
        save_png_atomically(plot_confusion_matrix(confusion, names, title=title), confusion_path),
        save_png_atomically(chart, iou_path),
    ]
