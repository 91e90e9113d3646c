"""Fault cases of the data layer: bad images, masks, pickles and rows that turn bad inside DataLoader workers.

Each case builds the bad input for real and asserts the promise: the `BadSampleError` (or `DataError`) names the
file and the problem before any expensive work, one error line from a script, or a correct result.
"""

from __future__ import annotations

import copyreg
import io
import json
import logging
import os
import pickle
import shutil
import signal
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from roadseg_utils.data import (
    BadSampleGuard,
    DataError,
    DataSourceArguments,
    EmptyDatasetError,
    SizeMismatchError,
    UnreadableImageError,
    UnreadableMaskError,
    UnsafePickleError,
    image_size,
    load_legacy_pickle,
    load_segmentation_dataset,
    load_split_records,
    read_label_map,
    records_to_dataset,
    to_label_map,
    to_rgb_image,
)
from roadseg_utils.labels import get_label_set
from tests.faults.conftest import assert_one_line_error, make_tree, run_script

LEVEL3 = get_label_set("idd-level3")
HEIGHT, WIDTH = 48, 80


def _rgb(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _mask(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, 6, (height, width), dtype=np.uint8)


def _encoded(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def _jpeg(array: np.ndarray, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return _encoded(array, "JPEG", quality=95, exif=exif.tobytes())


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb needs no pixels to be refused)."""
    data = bytearray(_encoded(np.zeros((1, 1), np.uint8)))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _flat(root: Path, count: int = 4, image_suffix: str = ".png") -> Path:
    """Image and mask folders: ``count`` random 48x80 RGB images with label-id masks of values 0-5."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = root / "images" / f"f{i}{image_suffix}"
        image.write_bytes(_jpeg(_rgb(i)) if image_suffix == ".jpg" else _encoded(_rgb(i)))
        (root / "masks" / f"f{i}.png").write_bytes(_encoded(_mask(i)))
    return root


def _flat_args(root: Path, **options) -> DataSourceArguments:
    options = {"train_fraction": 1.0, "val_fraction": 0.0, "test_fraction": 0.0, "num_workers": 1, **options}
    return DataSourceArguments(image_dir=str(root / "images"), mask_dir=str(root / "masks"), **options)


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail the test instead of hanging it: SIGALRM interrupts a blocked open() after ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _identity(row):
    return row


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory) -> Path:
    """One synthetic IDD tree for the module; tests that damage it copy it first."""
    return make_tree(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture
def flat(tmp_path) -> Path:
    return _flat(tmp_path / "flat")


# ---------------------------------------------------------------------------------------------------------
# Image integrity at start-up, from headers and trailers (decoding.image_size)


def _truncate(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def _flip_in_data(data: bytes) -> bytes:
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    return bytes(corrupt)


BAD_IMAGE_FILES = {
    "png-corrupt-crc": (lambda: _flip_in_data(_encoded(_rgb(0))), "truncated or corrupt PNG"),
    "png-truncated-in-pixels": (lambda: _truncate(_encoded(_rgb(0)), 0.6), "truncated or corrupt PNG"),
    "png-truncated-before-iend": (lambda: _encoded(_rgb(0))[:-8], "truncated or corrupt PNG"),
    "jpeg-truncated-after-header": (lambda: _truncate(_jpeg(_rgb(0)), 0.5), "truncated JPEG"),
    "zero-byte-file": (lambda: b"", "is an empty file (0 bytes)"),
    "text-with-png-extension": (lambda: b"just some notes\n" * 10, "not an image file"),
    "png-cut-in-its-header": (lambda: _encoded(_rgb(0))[:40], "truncated or corrupt PNG"),
    "jpeg-cut-in-its-header": (lambda: _jpeg(_rgb(0))[:30], "truncated or corrupt JPEG"),
    "decompression-bomb-error": (lambda: _png_with_size(30000, 30000), "decompression bomb refused"),
    "decompression-bomb-warning": (lambda: _png_with_size(10000, 10000), "decompression bomb refused"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_FILES), ids=list(BAD_IMAGE_FILES))
def test_bad_image_file_is_refused_from_its_headers(tmp_path, case):
    build, problem = BAD_IMAGE_FILES[case]
    path = tmp_path / ("frame.jpg" if "jpeg" in case else "frame.png")
    path.write_bytes(build())

    with pytest.raises(UnreadableImageError) as caught:
        image_size(str(path), str(path))
    assert caught.value.path == str(path) and problem in caught.value.problem
    # The same bytes as an HF dataset stores them (no file) give the same verdict.
    if path.stat().st_size:
        with pytest.raises(UnreadableImageError, match="cannot read image"):
            image_size({"bytes": path.read_bytes(), "path": None}, "row 0")


@pytest.mark.parametrize("padding", [b"", b"\x00" * 70_000, b"trailer after the end marker"],
                         ids=["jpeg-complete", "jpeg-zero-padded-past-a-block", "jpeg-trailer-after-eoi"])
def test_complete_jpeg_passes_with_padding_or_a_trailer(tmp_path, padding):
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg(_rgb(0)) + padding)
    assert image_size(str(path), "frame") == (HEIGHT, WIDTH)


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink-loop", "broken-symlink"])
def test_path_that_is_not_an_image_file_is_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "frame.png"
    if kind == "directory":
        path.mkdir()
        expected = "is a directory"
    elif kind == "fifo":
        os.mkfifo(path)
        expected = "not a regular file"
    elif kind == "symlink-loop":
        os.symlink(path, path)
        expected = "symbolic links"
    else:
        os.symlink(tmp_path / "gone.png", path)
        expected = "broken symbolic link"

    with _deadline(10):
        for read in (lambda: image_size(str(path), str(path)), lambda: to_rgb_image(str(path), str(path))):
            with pytest.raises(UnreadableImageError) as caught:
                read()
            assert caught.value.path == str(path) and expected in caught.value.problem


def test_unreadable_image_file_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "frame.png"
    path.write_bytes(_encoded(_rgb(0)))
    path.chmod(0)
    with pytest.raises(UnreadableImageError, match="permission denied"):
        image_size(str(path), str(path))


def test_start_up_validation_stops_on_a_truncated_jpeg_naming_it(tmp_path):
    root = _flat(tmp_path / "flat", image_suffix=".jpg")
    bad = root / "images" / "f2.jpg"
    bad.write_bytes(_truncate(bad.read_bytes(), 0.5))

    with pytest.raises(UnreadableImageError) as caught:
        load_split_records(_flat_args(root), LEVEL3)
    assert caught.value.path == str(bad) and "truncated JPEG" in caught.value.problem
    kept = load_split_records(_flat_args(root, on_bad_sample="skip"), LEVEL3)["train"]
    assert [Path(r.image_path).name for r in kept.records] == ["f0.jpg", "f1.jpg", "f3.jpg"]
    assert kept.skipped[0][0] == str(bad)


# ---------------------------------------------------------------------------------------------------------
# Silent wrong results: 16-bit and float images, lossy masks, unlabelled splits, EXIF orientation


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path, mode):
    values = np.linspace(0, 65535, HEIGHT * WIDTH).reshape(HEIGHT, WIDTH).astype(np.uint16)
    if mode == "I;16B":
        image = Image.frombytes(mode, (WIDTH, HEIGHT), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values).convert(mode) if mode == "I" else Image.fromarray(values)
    # PNG stores 16-bit greyscale (read back as I;16); a 32-bit I image needs TIFF.
    path = tmp_path / ("grey.tif" if mode == "I" else "grey.png")
    (image if mode != "I;16B" else Image.fromarray(values)).save(path)

    for value in (image, str(path)):
        decoded = np.asarray(to_rgb_image(value, "grey"))
        assert np.array_equal(decoded[..., 0], (values >> 8).astype(np.uint8))
        assert decoded.mean() < 200  # clipped to 8 bits, almost every pixel would be 255
    assert image_size(str(path), "grey") == (HEIGHT, WIDTH)


def test_float_image_is_refused_at_start_up_with_its_mode(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.random.default_rng(0).random((HEIGHT, WIDTH), dtype=np.float32)).save(path)

    for read in (image_size, to_rgb_image):
        with pytest.raises(UnreadableImageError) as caught:
            read(str(path), str(path))
        assert caught.value.path == str(path) and "mode F has no faithful RGB conversion" in caught.value.problem


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"], ids=["jpeg-mask", "lossy-webp-mask"])
def test_lossy_mask_is_refused_by_format(flat, fmt):
    mask = flat / "masks" / "f1.png"
    lossy = flat / "masks" / "f1.lossy"
    lossy.write_bytes(_encoded(_mask(1), fmt, quality=90))
    os.replace(lossy, mask)  # a lossy file behind a .png name: the format decides, not the name

    with pytest.raises(UnreadableMaskError) as caught:
        load_split_records(_flat_args(flat), LEVEL3)
    assert caught.value.path == str(flat / "images" / "f1.png")
    assert str(mask) in caught.value.problem and "store masks as PNG" in caught.value.problem
    with pytest.raises(UnreadableMaskError, match="lossy format"):
        read_label_map(mask)


def test_lossless_webp_mask_keeps_its_values(tmp_path):
    path = tmp_path / "mask.webp"
    Image.fromarray(_mask(0)).convert("RGB").save(path, "WEBP", lossless=True)
    assert np.array_equal(to_label_map(Image.open(path).convert("L"), 3, "mask"), _mask(0))
    with Image.open(path) as image:
        assert image.format == "WEBP"


def test_split_without_a_labelled_pixel_is_an_error_naming_source_and_split(flat):
    for mask in (flat / "masks").iterdir():
        mask.write_bytes(_encoded(np.full((HEIGHT, WIDTH), 255, np.uint8)))

    with pytest.raises(EmptyDatasetError) as caught:
        load_split_records(_flat_args(flat), LEVEL3)
    assert str(caught.value).startswith(f"{flat / 'images'} [train]: none of its 4 masks holds a labelled pixel")


def test_all_ignore_pickle_split_is_an_error(tmp_path):
    rows = [{"pixel_values": _rgb(i), "label": np.full((HEIGHT, WIDTH), 255, np.uint8)} for i in range(3)]
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(rows))
    args = DataSourceArguments(pickle_path=str(legacy), train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(EmptyDatasetError, match=r"legacy.pkl \[train\]: none of its 3 masks holds a labelled pixel"):
        load_segmentation_dataset(args)


def _rotated_flat(root: Path, mask_upright: bool) -> Path:
    """Folders with one JPEG stored 48x80 but EXIF-rotated (orientation 6: shown 80x48), and one plain JPEG."""
    _flat(root, count=2, image_suffix=".jpg")
    (root / "images" / "f0.jpg").write_bytes(_jpeg(_rgb(0), orientation=6))
    mask = _mask(0, WIDTH, HEIGHT) if mask_upright else _mask(0)
    (root / "masks" / "f0.png").write_bytes(_encoded(mask))
    return root


def test_exif_rotated_jpeg_is_read_upright_at_validation_and_when_decoded(tmp_path):
    root = _rotated_flat(tmp_path / "flat", mask_upright=True)
    train = load_split_records(_flat_args(root), LEVEL3)["train"]
    assert train.sizes == [(WIDTH, HEIGHT), (HEIGHT, WIDTH)]

    row = records_to_dataset(train.records, LEVEL3, train.sizes)[0]
    assert (row["image"].height, row["image"].width) == row["label"].shape == (WIDTH, HEIGHT)


def _png_with_late_exif(array: np.ndarray, orientation: int) -> bytes:
    """A PNG whose eXIf chunk (orientation) comes after the pixel data, where PIL finds it only when decoding."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encoded(array, exif=exif.tobytes())
    start = data.index(b"eXIf") - 4
    end = start + 12 + struct.unpack(">I", data[start:start + 4])[0]
    chunk, rest = data[start:end], data[:start] + data[end:]
    iend = rest.index(b"IEND") - 4
    return rest[:iend] + chunk + rest[iend:]


def test_png_with_exif_after_its_pixels_is_sized_as_decoded(tmp_path):
    path = tmp_path / "late.png"
    path.write_bytes(_png_with_late_exif(_rgb(0), orientation=8))
    with Image.open(path) as image:
        assert "exif" not in image.info  # not visible from the header
    decoded = to_rgb_image(str(path), "late")
    assert image_size(str(path), "late") == (decoded.height, decoded.width) == (WIDTH, HEIGHT)


def test_exif_rotated_jpeg_with_a_stored_orientation_mask_fails_at_start_up(tmp_path):
    root = _rotated_flat(tmp_path / "flat", mask_upright=False)
    with pytest.raises(SizeMismatchError) as caught:
        load_split_records(_flat_args(root), LEVEL3)
    assert caught.value.path == str(root / "images" / "f0.jpg")
    assert f"mask is {HEIGHT}x{WIDTH} but image is {WIDTH}x{HEIGHT}" in caught.value.problem


def test_exif_rotated_jpeg_through_an_hf_image_column_validates_as_it_decodes(tmp_path):
    import datasets
    root = _rotated_flat(tmp_path / "flat", mask_upright=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    columns = {"image": [str(root / "images" / f"f{i}.jpg") for i in range(2)],
               "label": [str(root / "masks" / f"f{i}.png") for i in range(2)]}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "hf"))

    args = DataSourceArguments(dataset_name=str(tmp_path / "hf"), train_fraction=1.0, val_fraction=0.0,
                               test_fraction=0.0, num_workers=1)
    train = load_segmentation_dataset(args, LEVEL3)["train"]
    shapes = sorted((row["image"].height, row["image"].width, *row["label"].shape) for row in train)
    assert shapes == [(HEIGHT, WIDTH, HEIGHT, WIDTH), (WIDTH, HEIGHT, WIDTH, HEIGHT)]


def test_hf_dataset_with_a_missing_image_is_named_or_skipped(tmp_path):
    import datasets
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image(), "path": datasets.Value("string")}
    )
    rows = {"image": [Image.fromarray(_rgb(i)) for i in range(3)],
            "label": [Image.fromarray(_mask(i)) for i in range(3)], "path": ["a", "b", "c"]}
    rows["image"][1] = None
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    args = {"dataset_name": str(tmp_path / "hf"), "train_fraction": 1.0, "val_fraction": 0.0, "test_fraction": 0.0}

    with pytest.raises(UnreadableImageError, match="^b: has no image"):
        load_segmentation_dataset(DataSourceArguments(**args), LEVEL3)
    train = load_segmentation_dataset(DataSourceArguments(**args, on_bad_sample="skip"), LEVEL3)["train"]
    assert [row["path"] for row in train] == ["a", "c"]


# ---------------------------------------------------------------------------------------------------------
# Masks and polygon files that break


POLYGON_FAULTS = {
    "polygon-json-truncated": ('{"imgHeight": 48, "imgWidth": 80, "objects": [', "not valid JSON"),
    "polygon-json-label-not-a-string": (json.dumps({"imgHeight": 48, "imgWidth": 80, "objects": [
        {"label": 7, "polygon": [[0, 0], [5, 0], [5, 5]]}]}), "object 0 is malformed"),
    "polygon-json-nan-coordinates": (json.dumps({"imgHeight": 48, "imgWidth": 80, "objects": [
        {"label": "road", "polygon": [[0, 0], ["nan", 0], [5, 5]]}]}), "non-finite coordinates"),
    "polygon-json-objects-not-a-list": (json.dumps({"imgHeight": 48, "imgWidth": 80, "objects": {"a": 1}}),
                                        "not an IDD polygon annotation"),
    "polygon-json-nested-past-the-recursion-limit": ("[" * 100_000, "not valid JSON"),
    "polygon-json-giant-canvas": (json.dumps({"imgHeight": 10**6, "imgWidth": 10**6, "objects": []}),
                                  "not a plausible image size"),
}


@pytest.mark.parametrize("case", list(POLYGON_FAULTS), ids=list(POLYGON_FAULTS))
def test_malformed_polygon_json_names_the_file(tmp_path, case):
    text, problem = POLYGON_FAULTS[case]
    path = tmp_path / "frame_gtFine_polygons.json"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        read_label_map(path, 3)
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)


@pytest.mark.parametrize("kind", ["mask-is-a-directory", "mask-is-a-fifo"])
def test_mask_that_is_not_a_file_is_refused_without_blocking(flat, kind):
    mask = flat / "masks" / "f3.png"
    mask.unlink()
    mask.mkdir() if kind == "mask-is-a-directory" else os.mkfifo(mask)

    with _deadline(10), pytest.raises(UnreadableMaskError) as caught:
        load_split_records(_flat_args(flat), LEVEL3)
    assert caught.value.path == str(flat / "images" / "f3.png") and str(mask) in caught.value.problem


# ---------------------------------------------------------------------------------------------------------
# A sample that turns bad after validation, inside a DataLoader worker (BadSampleGuard)


@pytest.fixture
def validated(flat):
    """A validated 4-row dataset, then f1's image truncated behind validation's back."""
    train = load_split_records(_flat_args(flat), LEVEL3)["train"]
    dataset = records_to_dataset(train.records, LEVEL3, train.sizes)
    bad = flat / "images" / "f1.png"
    bad.write_bytes(_truncate(bad.read_bytes(), 0.5))
    return dataset, str(bad)


def _loader(dataset, workers: int = 1, context: str | None = None):
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                       multiprocessing_context=context)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_error_reaches_the_main_process_as_the_same_bad_sample_error(validated, context):
    dataset, bad = validated
    with pytest.raises(UnreadableImageError) as caught:
        list(_loader(BadSampleGuard(dataset, "error"), context=context))
    assert caught.value.path == bad and caught.value.problem.startswith("cannot read image")
    assert str(caught.value) == f"{bad}: {caught.value.problem}" and "\n" not in str(caught.value)


def test_bad_sample_error_rebuilds_from_a_worker_traceback_with_colons_in_the_path(tmp_path):
    # torch/_utils.py ExceptionWrapper.reraise builds exc_type(message) from the worker's formatted traceback.
    from torch._utils import ExceptionWrapper
    path = tmp_path / "odd: name.png"
    path.write_bytes(b"")
    try:
        raise UnreadableMaskError(str(path), "cannot read mask (x: y)")
    except UnreadableMaskError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UnreadableMaskError) as caught:
        wrapper.reraise()
    assert (caught.value.path, caught.value.problem) == (str(path), "cannot read mask (x: y)")
    with pytest.raises(EmptyDatasetError, match="^src: all 3 samples are bad"):
        try:
            raise EmptyDatasetError("src: all 3 samples are bad")
        except EmptyDatasetError:
            ExceptionWrapper(where="in DataLoader worker process 1").reraise()


def test_worker_skip_substitutes_the_next_good_row_and_warns_once(validated, caplog):
    dataset, bad = validated
    paths = [f"images/f{i}.png" for i in range(4)]
    guard = BadSampleGuard(dataset, "skip")
    with caplog.at_level(logging.WARNING):
        epochs = [[row["path"] for row in _loader(guard, workers=0)] for _ in range(2)]
    assert epochs == [[paths[0], paths[2], paths[2], paths[3]]] * 2
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"skipping {bad}: cannot read image")
    in_worker = [row["path"] for row in _loader(BadSampleGuard(dataset, "skip"), workers=1)]
    assert in_worker == epochs[0]


def test_worker_skip_for_evaluation_returns_none_for_the_bad_row(validated):
    dataset, _ = validated
    rows = list(_loader(BadSampleGuard(dataset, "skip", substitute=False)))
    assert [row is None for row in rows] == [False, True, False, False]


def test_every_row_bad_in_a_worker_is_one_empty_dataset_line(flat):
    train = load_split_records(_flat_args(flat), LEVEL3)["train"]
    dataset = records_to_dataset(train.records, LEVEL3, train.sizes)
    for image in (flat / "images").iterdir():
        image.write_bytes(b"gone")
    with pytest.raises(EmptyDatasetError) as caught:
        list(_loader(BadSampleGuard(dataset, "skip", source="flat [train]")))
    assert str(caught.value) == "flat [train]: all 4 samples are bad (on_bad_sample=skip)"


def test_guard_is_picklable_and_keeps_its_policy(validated):
    dataset, bad = validated
    copy = pickle.loads(pickle.dumps(BadSampleGuard(dataset, "error")))
    assert len(copy) == 4 and copy[0]["label"].shape == (HEIGHT, WIDTH)
    with pytest.raises(UnreadableImageError, match=f"^{bad}: cannot read image"):
        copy[1]
    with pytest.raises(ValueError, match="on_bad_sample must be 'error' or 'skip'"):
        BadSampleGuard(dataset, "ignore")


def test_mask_replaced_by_another_size_after_validation_is_a_size_mismatch_not_a_crash(flat):
    train = load_split_records(_flat_args(flat), LEVEL3)["train"]
    dataset = records_to_dataset(train.records, LEVEL3, train.sizes)
    (flat / "masks" / "f2.png").write_bytes(_encoded(_mask(2, HEIGHT - 8, WIDTH)))
    with pytest.raises(SizeMismatchError, match=f"mask is {HEIGHT - 8}x{WIDTH} but image is {HEIGHT}x{WIDTH}"):
        BadSampleGuard(dataset, "error")[2]


# ---------------------------------------------------------------------------------------------------------
# The legacy pickle admits only in-memory data


class _CallsImageFile:
    """Pickles as ``PngImageFile(path)``: a call that opens (and would read or block on) ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        from PIL.PngImagePlugin import PngImageFile
        return PngImageFile, (self.path,)


class _CallsImageOpen(_CallsImageFile):
    def __reduce__(self):
        return Image.open, (self.path,)


class _RunsOsSystem(_CallsImageFile):
    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _hostile(tmp_path: Path, payload) -> Path:
    crafted = tmp_path / "legacy.pkl"
    crafted.write_bytes(pickle.dumps([{"pixel_values": _rgb(0), "label": _mask(0), "extra": payload}]))
    return crafted


@pytest.mark.parametrize("target", ["local-file", "fifo", "dev-stdin"])
def test_pickle_cannot_open_a_path_through_pil(tmp_path, target):
    if target == "local-file":
        path = tmp_path / "secret.png"
        path.write_bytes(_encoded(_rgb(5)))
    elif target == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    else:
        path = Path("/dev/stdin")
    crafted = _hostile(tmp_path, _CallsImageFile(str(path)))

    with _deadline(10), pytest.raises(UnsafePickleError) as caught:
        load_legacy_pickle(crafted)
    assert str(caught.value).startswith(f"{crafted}: refused") and "PIL image class was called" in str(caught.value)
    if target == "local-file":  # the payload is live: unrestricted, it reads the file as an image
        assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(_CallsImageFile(str(path))))), _rgb(5))


@pytest.mark.parametrize("payload", [_CallsImageOpen, _RunsOsSystem], ids=["image-open", "os-system"])
def test_pickle_calling_a_function_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    crafted = _hostile(tmp_path, payload(str(marker)))
    with pytest.raises(UnsafePickleError, match=f"^{crafted}: refused to load global"):
        load_legacy_pickle(crafted)
    assert not marker.exists()


def _pil_image_pickle(width: int, height: int, pixels: bytes) -> bytes:
    """Protocol-4 opcodes of a pickled PngImageFile (NEWOBJ, then BUILD with PIL's state) of any claimed size."""
    size = b"J" + struct.pack("<i", width) + b"J" + struct.pack("<i", height) + b"\x86"
    state = b"](}X\x01\x00\x00\x00L" + size + b"NB" + struct.pack("<I", len(pixels)) + pixels + b"e"
    return b"\x80\x04cPIL.PngImagePlugin\nPngImageFile\n)\x81" + state + b"b."


class _GiantImageByReconstructor:
    """Pickles (protocol 0-2 style) as copyreg._reconstructor of a PIL image claiming 200000x200000 pixels."""

    def __reduce__(self):
        from PIL.PngImagePlugin import PngImageFile
        return copyreg._reconstructor, (PngImageFile, object, None), [{}, "L", (200_000, 200_000), None, b""]


@pytest.mark.parametrize("spelling", ["newobj", "reconstructor"])
def test_pickle_of_a_giant_pil_image_is_refused_before_allocating(tmp_path, spelling):
    # The crafted bytes are a real pickled image: unrestricted, a small one loads as a PIL image.
    assert pickle.loads(_pil_image_pickle(2, 2, b"\x07" * 4)).getpixel((1, 1)) == 7
    crafted = tmp_path / "legacy.pkl"
    giant = [{"pixel_values": _GiantImageByReconstructor(), "label": _mask(0)}]
    crafted.write_bytes(_pil_image_pickle(200_000, 200_000, b"") if spelling == "newobj" else pickle.dumps(giant, 2))
    with pytest.raises(UnsafePickleError, match=f"^{crafted}: refused: .*over the decompression-bomb limit"):
        load_legacy_pickle(crafted)


def test_pickle_path_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "legacy.pkl"
    os.mkfifo(fifo)
    with _deadline(10), pytest.raises(DataError, match=f"^{fifo}: pickle is not a regular file"):
        load_legacy_pickle(fifo)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_real_pickled_pil_images_still_load_from_their_bytes(tmp_path, protocol):
    opened = Image.open(io.BytesIO(_encoded(_rgb(1))))
    rows = [{"pixel_values": opened, "label": _mask(1)}, {"pixel_values": Image.fromarray(_rgb(2)), "label": _mask(2)}]
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(rows, protocol=protocol))
    loaded = load_legacy_pickle(legacy)
    assert [np.array_equal(np.asarray(row["pixel_values"]), _rgb(i + 1)) for i, row in enumerate(loaded)] == [True] * 2


# ---------------------------------------------------------------------------------------------------------
# End to end through run_selection.py: one line naming the file and the problem


@pytest.mark.parametrize("damage", ["mask-directory", "polygon-json-truncated", "image-png-truncated"])
def test_run_selection_stops_with_one_line_on_bad_data(shared_tree, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(shared_tree, data)
    mask = data / "gtFine" / "train" / "1" / "000004_gtFine_labellevel3Ids.png"
    if damage == "mask-directory":
        mask.unlink()
        mask.mkdir()
        mask.with_name("000004_gtFine_polygons.json").unlink()  # else the tree falls back to the polygons
        needles = [str(mask), "cannot read mask"]
    elif damage == "image-png-truncated":
        image = data / "leftImg8bit" / "train" / "1" / "000004_leftImg8bit.png"
        image.write_bytes(_truncate(image.read_bytes(), 0.7))
        needles = [str(image), "truncated or corrupt PNG"]
    else:
        mask.unlink()
        polygons = mask.with_name("000004_gtFine_polygons.json")
        polygons.write_text(polygons.read_text()[:100])
        needles = [str(polygons), "not valid JSON"]
    result = run_script("run_selection.py", "--data_dir", data, "--num_images", "3", "--output_dir", tmp_path / "out",
                        "--num_workers", "1")
    assert_one_line_error(result, *needles)


def test_run_selection_refuses_a_hostile_pickle_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    crafted = _hostile(tmp_path, _RunsOsSystem(str(marker)))
    result = run_script("run_selection.py", "--pickle_path", crafted, "--num_images", "1", "--output_dir",
                        tmp_path / "out")
    assert_one_line_error(result, str(crafted), "refused to load global")
    assert not marker.exists()
