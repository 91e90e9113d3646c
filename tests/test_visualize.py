"""Evaluation charts of roadseg_utils.visualize: confusion-matrix cell labels, and titles and labels inside the PNG."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from roadseg_utils import visualize
from roadseg_utils.labels import idd_label_set
from roadseg_utils.visualize import format_row_shares

LONG_NAMES = ["non-drivable fallback", "obs-str-bar-fallback"]
LONG_TITLE = "org/mask2former-swin-large-mapillary-vistas-semantic-finetuned-idd on validation (2000 images)"


def _percent(label: str) -> float:
    """The number a cell label reads as, in percent ('>99.9' reads as 99.9)."""
    return float(label.lstrip("<>"))


@pytest.mark.parametrize(
    ("share", "label"),
    [
        (0.0, "0"),
        (0.0004, "<0.1"),
        (0.004, "0.4"),
        (0.5, "50.0"),
        (0.994, "99.4"),
        (0.995, "99.5"),
        (0.997, "99.7"),
        (0.999, "99.9"),
        (0.9996, ">99.9"),
        (1.0, "100"),
        (np.nan, ""),
    ],
)
def test_format_row_shares_reads_as_the_percentage(share, label):
    assert format_row_shares(share).item() == label


def test_no_share_near_one_reads_as_zero_and_every_label_is_within_a_tenth_of_a_percent():
    near_one = np.array([0.994, 0.995, 0.996, 0.997, 0.998, 0.999, 0.9999, 1.0])
    for label in format_row_shares(near_one):
        assert not label.startswith(".") and _percent(label) >= 99.0, label
    shares = np.linspace(0.0, 1.0, 100_001)
    labels = format_row_shares(shares)
    read = np.array([_percent(label) for label in labels])
    assert np.all(np.abs(read - 100 * shares) <= 0.1 + 1e-9)
    # "100" and "0" are kept for rows with no confusion at all and cells with no pixel at all.
    assert set(np.flatnonzero(labels == "100")) == {shares.size - 1}
    assert set(np.flatnonzero(labels == "0")) == {0}


def test_format_row_shares_keeps_the_shape_and_refuses_values_outside_zero_to_one():
    assert format_row_shares(np.array([[0.25, np.nan], [1.0, 0.0]])).tolist() == [["25.0", ""], ["100", "0"]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        format_row_shares(np.array([0.5, 1.5]))


def test_confusion_cells_show_the_formatted_shares():
    # Rows: 997 of 1000 right (99.7 %), perfect, empty (grey, no text), 99.96 % right.
    confusion = np.array([[997, 3, 0, 0], [0, 50, 0, 0], [0, 0, 0, 0], [4, 0, 0, 9996]])
    figure = visualize.plot_confusion_matrix(confusion, ["road", "sky", "sidewalk", "car"])
    cells = {(int(text.get_position()[1]), int(text.get_position()[0])): text.get_text()
             for text in figure.axes[0].texts}
    # 3/1000 and 4/10000 are under the 0.5 % below which off-diagonal cells stay blank.
    assert cells == {(0, 0): "99.7", (1, 1): "100", (3, 3): ">99.9"}
    assert figure.axes[0].texts[0].get_color() == "white"  # a dark cell gets light text


def test_a_class_never_predicted_right_shows_zero_on_the_diagonal():
    figure = visualize.plot_confusion_matrix(np.array([[0, 10], [0, 10]]), ["road", "sky"])
    cells = {(int(text.get_position()[1]), int(text.get_position()[0])): text.get_text()
             for text in figure.axes[0].texts}
    assert cells == {(0, 0): "0", (0, 1): "100", (1, 1): "100"}


def _texts_outside(figure, texts) -> list[str]:
    """The texts among ``texts`` (drawn, not empty) whose rendered extent leaves the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    bounds = figure.bbox
    outside = []
    for text in texts:
        if not text.get_visible() or not text.get_text():
            continue
        extent = text.get_window_extent(renderer)
        if extent.x0 < bounds.x0 or extent.y0 < bounds.y0 or extent.x1 > bounds.x1 or extent.y1 > bounds.y1:
            outside.append(text.get_text())
    return outside


@pytest.mark.parametrize("num_labels", [2, 26, 30])
def test_every_confusion_matrix_text_lies_inside_the_saved_png(num_labels, tmp_path):
    from matplotlib.text import Text

    idd_names = list(idd_label_set(3).id2label.values())
    names = LONG_NAMES if num_labels == 2 else [*idd_names, *(f"obs-str-bar-fallback {i}" for i in range(4))][
        :num_labels]
    confusion = np.eye(num_labels, dtype=np.int64) * 9996 + 4
    figure = visualize.plot_confusion_matrix(confusion, names, title=LONG_TITLE)
    path = visualize.save_png_atomically(figure, tmp_path / "confusion.png")
    with Image.open(path) as picture:
        assert picture.size == (round(figure.bbox.width), round(figure.bbox.height))
    texts = figure.findobj(Text)
    axes = figure.axes[0]
    # The texts the issue was about are among those checked: the axis titles, the title and every class name.
    wanted = {axes.get_ylabel(), axes.get_xlabel(), *names}
    assert wanted <= {text.get_text() for text in texts}
    # The title is wrapped (inside words where it must), so it is compared without its white space.
    assert "".join(LONG_TITLE.split()) in {"".join(text.get_text().split()) for text in figure.texts}
    assert _texts_outside(figure, texts) == []


def test_per_class_iou_title_and_class_names_lie_inside_the_figure():
    names = [*LONG_NAMES, "road", "sky"]
    figure = visualize.plot_per_class_iou(np.array([0.5, np.nan, 0.99, 1.0]), names, [(128, 64, 128)] * 4, 0.8,
                                          title=LONG_TITLE + " " + LONG_TITLE)
    axes = figure.axes[0]
    assert _texts_outside(figure, [*figure.texts, axes.xaxis.label, *axes.get_yticklabels()]) == []


def test_figure_size_grows_only_for_names_longer_than_the_idd_ones():
    idd_longest = max(len(name) for name in idd_label_set(3).id2label.values())
    # run_eval's PNG-size check relies on the 26 IDD names leaving the size as confusion_matrix_figsize(26) says.
    assert visualize.confusion_matrix_figsize(26, idd_longest) == visualize.confusion_matrix_figsize(26)
    assert visualize.confusion_matrix_figsize(26, 60) > visualize.confusion_matrix_figsize(26)


def test_importing_visualize_does_not_load_matplotlib():
    code = "import sys, roadseg_utils.visualize; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
