"""Faults of run_selection.py: bad images and masks, lying caches, bad arguments and folders, signals, kills and reruns.

Each case builds its fault for real and asserts the promise: one ``error:`` line naming the file or option with a
non-zero exit and no traceback (found before any sample is decoded), a bad sample left out and counted, a cache
that never gives a stale answer, no orphaned worker, or, after a kill and a rerun, the same outputs as one
uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_selection
from roadseg_utils.data import label_cache
from roadseg_utils.data.label_cache import CACHE_FILE
from roadseg_utils.output_dir import INCOMPLETE_FILE, LOCK_FILE
from roadseg_utils.parallel import map_in_order
from roadseg_utils.selection import load_manifest
from tests.faults.conftest import REPO, make_tree, mounted_tmpfs

OUTPUTS = ("manifest.json", "manifest.csv", "report.md")
FRAME = "leftImg8bit/train/0/000000_leftImg8bit.png"
MASK = "gtFine/train/0/000000_gtFine_labellevel3Ids.png"
POOL_IMAGES = 72  # at least parallel.MIN_PARALLEL_SAMPLES, so two workers decode
SIGNAL_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    """A 12-image tree that no test changes."""
    return make_tree(tmp_path_factory.mktemp("clean") / "data")


@pytest.fixture(scope="module")
def pool_tree(tmp_path_factory) -> Path:
    """A tree large enough for the process pool (read-only use)."""
    return make_tree(tmp_path_factory.mktemp("pool") / "data", num_images=POOL_IMAGES, num_sequences=4)


@pytest.fixture
def hang_guard():
    """Fail the test (instead of blocking the suite) if it runs longer than a hang would allow."""

    def hung(signum, frame):
        pytest.fail("hung: a blocking read (a FIFO?) or a wait that never ends")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_decoding(monkeypatch) -> None:
    """Fail the test if any image header or label map is read in this process."""
    monkeypatch.setattr(label_cache, "label_map_counts", lambda *a, **k: pytest.fail(f"decoded the mask {a[0]}"))
    monkeypatch.setattr(label_cache, "image_size", lambda *a, **k: pytest.fail(f"read the image {a[0]}"))


def _args(data: Path, output: Path, *extra: str, budget: str | None = "3", workers: str = "1") -> list[str]:
    """A selection of ``data`` into ``output``, whose own label cache (``_cache(output)``) starts empty."""
    budget_args = ["--num_images", budget] if budget is not None else []
    return ["--data_dir", str(data), "--output_dir", str(output), *budget_args, "--num_workers", workers,
            "--label_cache_dir", str(output / "cache"), *extra]


def _cache(output: Path) -> Path:
    return output / "cache" / CACHE_FILE


def _select(*argv: str) -> dict:
    return run_selection.main(list(argv))


def _refused(argv: list[str], capsys, *needles: str) -> str:
    """main(argv) exits non-zero with one error line holding every needle, and prints no traceback."""
    with pytest.raises(SystemExit) as stopped:
        run_selection.main(argv)
    captured = capsys.readouterr()
    assert stopped.value.code not in (0, None)
    assert "Traceback" not in captured.err
    if isinstance(stopped.value.code, str):  # sys.exit("error: ..."), which Python prints on stderr
        lines = [stopped.value.code]
    else:  # argparse usage error, already on stderr
        lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "\n" not in lines[0] and "error:" in lines[0], lines
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def _tree_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(folder: Path) -> dict[str, dict]:
    return {row["path"]: row for row in load_manifest(folder / "manifest.json")[1]}


def _save_png(path: Path, array: np.ndarray, compress_level: int = 6) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=compress_level)


# ---------------------------------------------------------------------------------------------------------
# Bad samples: an image that cannot be read or does not fit its mask is never ranked, selected or materialised


def _corrupt_png(tree: Path) -> None:
    path = tree / FRAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)  # pixel data altered: the chunk's CRC no longer matches
    path.write_bytes(bytes(data))


def _truncated_png(tree: Path) -> None:
    path = tree / FRAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_size(tree: Path) -> None:
    with Image.open(tree / FRAME) as image:
        image.resize((image.width, image.height - 8)).save(tree / FRAME)


def _not_an_image(tree: Path) -> None:
    (tree / FRAME).write_text("this is not a picture\n")


def _truncated_jpeg(tree: Path) -> None:
    path = tree / FRAME
    jpeg = path.with_suffix(".jpg")
    with Image.open(path) as image:
        image.save(jpeg, format="JPEG", quality=90)
    path.unlink()
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 2 // 3])  # header intact, scan cut short


def _mask_as_jpeg(tree: Path) -> None:
    with Image.open(tree / MASK) as mask:
        mask.save(tree / MASK, format="JPEG", quality=95)  # lossy bytes under the .png name


def _truncated_mask(tree: Path) -> None:
    path = tree / MASK
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _mask_is_a_fifo(tree: Path) -> None:
    (tree / MASK).unlink()
    (tree / MASK.replace("labellevel3Ids.png", "polygons.json")).unlink()  # no polygons to fall back on
    os.mkfifo(tree / MASK)  # reading it would block forever


def _image_is_a_fifo(tree: Path) -> None:
    (tree / FRAME).unlink()
    os.mkfifo(tree / FRAME)


BAD_SAMPLES: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt-png-image": (_corrupt_png, "000000_leftImg8bit.png"),
    "truncated-png-image": (_truncated_png, "000000_leftImg8bit.png"),
    "image-size-differs-from-mask": (_other_size, "but image is 40x80"),
    "image-is-text": (_not_an_image, "000000_leftImg8bit.png"),
    "jpeg-image-truncated-after-header": (_truncated_jpeg, "000000_leftImg8bit.jpg"),
    "mask-stored-as-jpeg": (_mask_as_jpeg, "stored as JPEG"),
    "truncated-mask": (_truncated_mask, "000000_gtFine_labellevel3Ids.png"),
    "mask-is-a-fifo": (_mask_is_a_fifo, "000000_gtFine_labellevel3Ids.png"),
    "image-is-a-fifo": (_image_is_a_fifo, "000000_leftImg8bit.png"),
}


@pytest.mark.parametrize("fault", list(BAD_SAMPLES))
def test_bad_sample_stops_the_run_in_one_line(fault, tree, tmp_path, capsys, hang_guard):
    damage, needle = BAD_SAMPLES[fault]
    damage(tree)
    _refused(_args(tree, tmp_path / "out"), capsys, needle)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("fault", ["corrupt-png-image", "image-size-differs-from-mask", "truncated-mask"])
def test_skipped_bad_sample_is_never_ranked_selected_or_materialised(fault, tree, tmp_path, monkeypatch):
    BAD_SAMPLES[fault][0](tree)
    output = tmp_path / "out"
    args = _args(tree, output, "--on_bad_sample", "skip", "--materialize", "copy", "--no_plots", budget="11")
    assert _select(*args)["num_candidates"] == 11
    assert FRAME not in _rows(output) and len(_rows(output)) == 11
    header, _ = load_manifest(output / "manifest.json")
    assert [Path(name).name for name in header["skipped"]] == ["000000_leftImg8bit.png"]
    assert "| images skipped as bad | 1 | |" in (output / "report.md").read_text()
    assert not list((output / "subset").rglob("000000_*"))  # the bad frame's files are not in the subset
    # The rerun remembers the verdict: it reads no image and decodes no mask, and says the same.
    first = _outputs(output)
    monkeypatch.setattr(label_cache, "label_map_counts", lambda *a, **k: pytest.fail("decoded a mask"))
    monkeypatch.setattr(label_cache, "image_size", lambda *a, **k: pytest.fail("read an image"))
    assert _select(*args)["decoded"] == 0
    assert _outputs(output) == first


def _all_ignore(path: Path) -> None:
    with Image.open(path) as mask:
        _save_png(path, np.full_like(np.asarray(mask), 255))


def test_pool_whose_masks_are_all_ignore_is_one_line(tree, tmp_path, capsys):
    for path in (tree / "gtFine").rglob("*_labellevel3Ids.png"):
        _all_ignore(path)
    _refused(_args(tree, tmp_path / "out"), capsys, str(tree), "nothing to rank images by")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_image_whose_mask_is_all_ignore_ranks_last_with_a_warning(tree, tmp_path, caplog):
    _all_ignore(tree / MASK)
    _select(*_args(tree, tmp_path / "out", "--no_plots", budget="11"))
    row = _rows(tmp_path / "out")[FRAME]
    assert (row["cds"], row["rcs"], row["selected"], row["rank"]) == (0.0, 0.0, False, 12)
    assert any("1 of 12 pool images hold no class" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# Caches that cannot lie


def _uncompressed_tree(tree: Path) -> None:
    """Re-save every mask uncompressed, so that another mask of the same shape has the same byte size."""
    for path in (tree / "gtFine").rglob("*_labellevel3Ids.png"):
        with Image.open(path) as mask:
            _save_png(path, np.asarray(mask), compress_level=0)


def _swap_classes(path: Path) -> np.ndarray:
    """The mask of ``path`` with every pixel of its most common class turned into bus (11)."""
    with Image.open(path) as mask:
        label = np.asarray(mask).copy()
    values, counts = np.unique(label[label != 255], return_counts=True)
    label[label == values[np.argmax(counts)]] = 11
    return label


def _rewrite_in_place(path: Path, label: np.ndarray) -> None:
    info = path.stat()
    _save_png(path, label, compress_level=0)  # same inode, same size
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def _replace_by_copy(path: Path, label: np.ndarray) -> None:
    other = path.with_name("other.png")
    _save_png(other, label, compress_level=0)
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    subprocess.run(["cp", "--preserve=timestamps", str(other), str(path)], check=True)
    other.unlink()


def _replace_by_rename(path: Path, label: np.ndarray) -> None:
    other = path.with_name("other.png")
    _save_png(other, label, compress_level=0)
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(other, path)  # a new inode with the old name, size and times


@pytest.mark.parametrize("replace", [_rewrite_in_place, _replace_by_copy, _replace_by_rename],
                         ids=["mask-rewritten-with-old-mtime", "mask-cp-preserve-timestamps", "mask-renamed-over"])
def test_mask_replaced_with_same_size_and_mtime_is_decoded_again(replace, tree, tmp_path):
    _uncompressed_tree(tree)
    output = tmp_path / "out"
    args = _args(tree, output, "--no_plots", "--rare_classes", "bus")
    _select(*args)
    assert _rows(output)[FRAME]["rcs"] == 0.0  # no bus in the frame's first mask
    mask = tree / MASK
    before = mask.stat()
    label = _swap_classes(mask)
    replace(mask, label)
    after = mask.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # what the old key saw
    assert _select(*args)["decoded"] == 1
    assert _rows(output)[FRAME]["rcs"] == 1.0  # the new mask's bus, not the stale histogram
    fresh = tmp_path / "fresh"
    _select(*_args(tree, fresh, "--no_plots", "--rare_classes", "bus"))
    assert _outputs(output) == _outputs(fresh)


def test_image_replaced_by_another_size_with_old_mtime_is_checked_again(tree, tmp_path, capsys):
    output = tmp_path / "out"
    _select(*_args(tree, output, "--no_plots"))
    info = (tree / FRAME).stat()
    _other_size(tree)
    os.utime(tree / FRAME, ns=(info.st_atime_ns, info.st_mtime_ns))
    _refused(_args(tree, output, "--no_plots"), capsys, "000000_leftImg8bit.png", "but image is 40x80")


def _write_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


def _truncated_cache(cache: Path) -> None:
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])


def _garbage_cache(cache: Path) -> None:
    cache.write_bytes(os.urandom(4096))


def _foreign_npz(cache: Path) -> None:
    _write_npz(cache, weights=np.ones(3))


def _old_version(cache: Path) -> None:
    # Today's layout minus one field, as an earlier version wrote it.
    _write_npz(cache, version=np.int64(1), keys=np.array(["a"]), stamps=np.zeros((1, 2), np.int64),
               histograms=np.zeros((1, 256), np.int64))


def _wrong_arrays(cache: Path) -> None:
    with np.load(cache) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["histograms"] = arrays["histograms"][:, :100].astype(np.float32)
    _write_npz(cache, **arrays)


def _pickled_cache(cache: Path) -> None:
    _write_npz(cache, version=np.int64(2), keys=np.array([{"evil": 1}], dtype=object))


CORRUPT_CACHES = {
    "cache-truncated": _truncated_cache,
    "cache-random-bytes": _garbage_cache,
    "cache-foreign-npz": _foreign_npz,
    "cache-older-version": _old_version,
    "cache-arrays-of-wrong-shape": _wrong_arrays,
    "cache-holding-a-pickle": _pickled_cache,
}


@pytest.mark.parametrize("fault", list(CORRUPT_CACHES))
def test_corrupt_cache_is_rebuilt_with_one_warning(fault, clean_tree, tmp_path, caplog):
    reference, output = tmp_path / "reference", tmp_path / "out"
    _select(*_args(clean_tree, reference, "--no_plots"))
    _select(*_args(clean_tree, output, "--no_plots"))
    CORRUPT_CACHES[fault](_cache(output))
    caplog.clear()
    assert _select(*_args(clean_tree, output, "--no_plots"))["decoded"] == 12
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "label cache" in r.getMessage()]
    assert len(warnings) == 1 and "rebuilding it" in warnings[0] and str(_cache(output)) in warnings[0]
    assert _outputs(output) == _outputs(reference)
    assert _select(*_args(clean_tree, output, "--no_plots"))["decoded"] == 0  # rebuilt, so trusted again


def test_cache_path_that_is_a_folder_is_refused_before_work(clean_tree, tmp_path, capsys, no_decoding):
    _cache(tmp_path / "out").mkdir(parents=True)
    _refused(_args(clean_tree, tmp_path / "out"), capsys, CACHE_FILE, "is not a file")


# ---------------------------------------------------------------------------------------------------------
# Arguments and folders: one line, before any sample is read


BAD_ARGUMENTS = {
    "alpha-nan": (["--alpha", "nan"], "alpha=nan"),
    "beta-negative": (["--beta", "-1"], "beta=-1"),
    "all-weights-zero": (["--alpha", "0", "--beta", "0", "--gamma", "0"], "at least one weight"),
    "num-images-zero": (["--num_images", "0"], "num_images must be at least 1"),
    "num-images-negative": (["--num_images", "-4"], "num_images must be at least 1"),
    "num-images-above-pool": (["--num_images", "13"], "asked for 13 images but the dataset has 12"),
    "fraction-zero": (["--fraction", "0"], "fraction must be in (0, 1]"),
    "fraction-above-one": (["--fraction", "1.5"], "fraction must be in (0, 1]"),
    "fraction-nan": (["--fraction", "nan"], "fraction must be in (0, 1]"),
    "unknown-strategy": (["--strategy", "best"], "invalid choice: 'best'"),
    "unknown-cds-mode": (["--cds_mode", "variance"], "invalid choice: 'variance'"),
    "unknown-materialize-mode": (["--materialize", "zip"], "invalid choice: 'zip'"),
    "negative-seed": (["--seed", "-1"], "seed must be >= 0"),
    "zero-temperature": (["--temperature", "0"], "temperature must be > 0"),
    "rare-threshold-nan": (["--rare_threshold", "nan"], "rare_threshold"),
    "unknown-rare-class": (["--rare_classes", "unicorn"], "unknown rare class 'unicorn'"),
    "unknown-on-bad-sample": (["--on_bad_sample", "ignore"], "on_bad_sample"),
}


@pytest.mark.parametrize("fault", list(BAD_ARGUMENTS))
def test_bad_argument_is_one_line_before_any_work(fault, clean_tree, tmp_path, capsys, no_decoding):
    extra, needle = BAD_ARGUMENTS[fault]
    budget = None if "--num_images" in extra or "--fraction" in extra else "2"
    _refused(_args(clean_tree, tmp_path / "out", *extra, budget=budget), capsys, needle)
    assert not (tmp_path / "out" / "manifest.json").exists()


def _json_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "args.json"
    path.write_text(text)
    return str(path)


BAD_JSON = {
    "json-malformed": ('{"data_dir": ', "not a readable JSON argument file"),
    "json-not-an-object": ("[1, 2]", "expected a JSON object"),
    "json-wrong-type": ('{"data_dir": "D", "output_dir": "O", "num_images": "5"}', "num_images must be"),
    "json-unknown-option": ('{"data_dir": "D", "output_dir": "O", "budget": 5}', "unknown options ['budget']"),
    "json-missing-output-dir": ('{"data_dir": "D"}', "'output_dir' is missing"),
    "json-nan-weight": ('{"data_dir": "D", "output_dir": "O", "alpha": NaN}', "alpha=nan"),
}


@pytest.mark.parametrize("fault", list(BAD_JSON))
def test_bad_json_argument_file_is_one_line_naming_it(fault, clean_tree, tmp_path, capsys, no_decoding):
    text, needle = BAD_JSON[fault]
    path = _json_file(tmp_path, text.replace('"D"', json.dumps(str(clean_tree))).replace('"O"', '"out"'))
    line = _refused([path], capsys, needle)
    if fault != "json-nan-weight":
        assert path in line


def test_missing_json_argument_file_is_one_line(tmp_path, capsys):
    _refused([str(tmp_path / "absent.json")], capsys, "absent.json", "argument file not found")


FOLDER_FAULTS = {
    "data-dir-missing": ("data", "--data_dir", "does not exist"),
    "data-dir-is-a-file": ("data", "--data_dir", "is not a folder"),
    "output-dir-is-a-file": ("output", "--output_dir", "is a file, not a folder"),
    "output-dir-uncreatable": ("output", "--output_dir", "cannot create it"),
    "cache-dir-is-a-file": ("cache", "--label_cache_dir", "is a file, not a folder"),
    "materialize-into-foreign-folder": ("subset", "is not a subset written by run_selection.py", ""),
    "materialize-over-the-output-dir": ("subset-output", "holds --output_dir", ""),
    "materialize-over-the-data": ("subset-data", "holds the data being selected from", ""),
}


@pytest.mark.parametrize("fault", list(FOLDER_FAULTS))
def test_unusable_folder_is_one_line_before_any_work(fault, clean_tree, tmp_path, capsys, no_decoding):
    what, first, second = FOLDER_FAULTS[fault]
    data, output, extra = clean_tree, tmp_path / "out", []
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    if fault == "data-dir-missing":
        data = tmp_path / "nowhere"
    elif what == "data":
        data = a_file
    elif fault == "output-dir-is-a-file":
        output = a_file
    elif fault == "output-dir-uncreatable":
        output = a_file / "out"
    elif what == "cache":
        extra = ["--label_cache_dir", str(a_file)]
    elif what == "subset":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        extra = ["--materialize", "copy", "--materialize_dir", str(tmp_path / "mine")]
    elif what == "subset-output":
        extra = ["--materialize", "copy", "--materialize_dir", str(tmp_path)]
    else:
        extra = ["--materialize", "symlink", "--materialize_dir", str(clean_tree.parent)]
    _refused(_args(data, output, *extra), capsys, first, second)
    assert not (output / "manifest.json").exists()
    if what == "subset":
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_second_concurrent_run_into_one_folder_is_one_line(clean_tree, tmp_path, capsys, no_decoding):
    output = tmp_path / "out"
    output.mkdir()
    holder = subprocess.Popen(  # another process holds the folder's lock, as a running selection does
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(output / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"run_selection.py (pid %d)" % os.getpid())
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _refused(_args(clean_tree, output), capsys, str(output), f"pid {holder.pid}", "is writing into this folder")
    finally:
        holder.kill()
        holder.wait()
    assert not (output / "manifest.json").exists()
    fcntl.flock(os.open(output / LOCK_FILE, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock went with it


def test_read_only_output_dir_is_one_line_before_any_work(clean_tree, capsys, no_decoding):
    with mounted_tmpfs("1m", read_only=True) as read_only:
        _refused(_args(clean_tree, read_only / "out"), capsys, str(read_only / "out"), "cannot create it")
        _refused(_args(clean_tree, read_only), capsys, str(read_only), "cannot write into it")


def test_full_disk_while_writing_outputs_is_one_line_and_marks_the_folder(clean_tree, tmp_path, capsys):
    with mounted_tmpfs("256k") as disk:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as stream:
            try:
                while True:
                    stream.write(bytes(4096))
            except OSError:  # the disk is full
                pass
        # Leave room for the folder's small files (lock, marker, manifests), not for the plots.
        with open(filler, "r+b") as stream:
            stream.truncate(filler.stat().st_size - 24 * 1024)
        output = disk / "out"
        line = _refused(_args(clean_tree, output), capsys, str(output))
        assert "No space left on device" in line
        # Whatever got written, the marker says the run did not finish; no temporary file is left.
        assert (output / INCOMPLETE_FILE).exists()
        assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# Signals and kills: no orphaned worker; a rerun ends with the outputs of one uninterrupted run

DRIVER = textwrap.dedent("""
    import os, shutil, signal, sys, time
    sys.path.insert(0, os.environ["REPO"])
    import run_selection
    from roadseg_utils.data import label_cache

    hook, argv = sys.argv[1], sys.argv[2:]
    kind, _, value = hook.partition(":")
    if kind == "slow-workers":  # each worker announces itself, then decodes very slowly
        real = label_cache.label_map_counts
        def slow(path, level):
            open(os.path.join(value, str(os.getpid())), "w").close()
            time.sleep(60)
            return real(path, level)
        label_cache.label_map_counts = slow
    elif kind == "kill-at-replace":  # SIGKILL just before a file named `value` is renamed into place
        real_replace = os.replace
        def replace(source, target, *args, **kwargs):
            if os.path.basename(os.fspath(target)) == value:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(source, target, *args, **kwargs)
        os.replace = replace
    elif kind == "kill-at-copy":  # SIGKILL at the value-th file copied into the subset
        real_copy, copied = shutil.copy2, []
        def copy2(source, target, **kwargs):
            copied.append(source)
            if len(copied) == int(value):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_copy(source, target, **kwargs)
        shutil.copy2 = copy2
    run_selection.main(argv)
""")


def _start_driver(tmp_path: Path, hook: str, argv: list[str]) -> subprocess.Popen:
    """run_selection.main(argv) in a child process with a test hook; its output goes to tmp_path/driver.log."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    environment = {**os.environ, "REPO": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Its own session: every process it starts can be found by session id after it dies. A log file, not a pipe:
    # an orphaned worker holding a pipe open would keep the test waiting for its end.
    with open(tmp_path / "driver.log", "wb") as log:
        return subprocess.Popen([sys.executable, str(script), hook, *argv], cwd=REPO, env=environment,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "driver.log").read_text(errors="replace")


def _live_session_members(session: int) -> list[int]:
    """Pids of the live (not zombie) processes of ``session``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _start_mid_decode(tmp_path: Path, argv: list[str]) -> subprocess.Popen:
    """A selection whose two pool workers are both inside a (slow) label-map decode."""
    marks = tmp_path / "workers"
    marks.mkdir()
    driver = _start_driver(tmp_path, f"slow-workers:{marks}", argv)
    try:
        _wait_for(lambda: len(list(marks.iterdir())) >= 2 or driver.poll() is not None, 60, "two decoding workers")
    except AssertionError:
        driver.kill()
        raise
    assert driver.poll() is None, _log(tmp_path)[-3000:]
    workers = {int(p.name) for p in marks.iterdir()}
    assert workers <= set(_live_session_members(driver.pid)) and len(workers) == 2
    return driver


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["sigterm", "sigint", "sigkill"])
def test_killed_parent_leaves_no_orphaned_worker(signum, pool_tree, tmp_path):
    driver = _start_mid_decode(tmp_path, _args(pool_tree, tmp_path / "out", workers="2"))
    driver.send_signal(signum)
    try:
        driver.wait(timeout=SIGNAL_TIMEOUT)
    finally:
        driver.kill()
    _wait_for(lambda: not _live_session_members(driver.pid), SIGNAL_TIMEOUT, "the workers to end")
    output = _log(tmp_path)
    if signum == signal.SIGINT:  # Ctrl-C: one line and the conventional status, no traceback from anyone
        assert driver.returncode == 130 and "Traceback" not in output, output[-3000:]
        assert [line for line in output.splitlines() if "error:" in line] == [
            f"error: interrupted; rerun the same command to complete {tmp_path / 'out'}"
        ]
    else:
        assert driver.returncode == -signum
    assert not (tmp_path / "out" / "manifest.json").exists()


def _live_children() -> list[int]:
    """Pids of this process's live (not zombie) children."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else []
        except OSError:
            continue
        if fields and fields[0] != "Z" and int(fields[1]) == os.getpid():
            children.append(int(entry.name))
    return children


def _slow_square(value: int) -> int:
    time.sleep(0.2 if value else 0)
    return value * value


def test_pool_abandoned_early_stops_its_workers_and_restores_the_signal_handlers():
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # Earlier tests of the same session may have left children of their own (e.g. multiprocessing's resource
    # tracker); only the pool's workers count here.
    before = set(_live_children())
    with closing(map_in_order(_slow_square, range(100), 2)) as results:
        assert next(results) == 0
        workers = set(_live_children()) - before
        assert len(workers) >= 2
        assert signal.getsignal(signal.SIGTERM) is not handlers[signal.SIGTERM]  # the pool's own, while it runs
    # Closed with tasks still running: the workers are killed, not waited for through 100 slow tasks.
    _wait_for(lambda: not workers & set(_live_children()), SIGNAL_TIMEOUT, "the workers to end")
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


@pytest.fixture(scope="module")
def reference_run(pool_tree, tmp_path_factory) -> Path:
    """One uninterrupted selection of the pool tree, with its subset copied."""
    output = tmp_path_factory.mktemp("reference") / "out"
    _select(*_kill_args(pool_tree, output))
    return output


def _kill_args(data: Path, output: Path) -> list[str]:
    return _args(data, output, "--materialize", "copy", "--no_plots", budget="20", workers="2")


KILL_POINTS = {
    "sigkill-while-decoding": "slow-workers",
    "sigkill-before-the-cache-is-renamed-into-place": f"kill-at-replace:{CACHE_FILE}",
    "sigkill-between-manifest-and-report": "kill-at-replace:report.md",
    "sigkill-during-materialize-copy": "kill-at-copy:7",
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_rerun_after_a_kill_gives_the_uninterrupted_outputs(point, pool_tree, reference_run, tmp_path):
    output = tmp_path / "out"
    argv = _kill_args(pool_tree, output)
    if point == "sigkill-while-decoding":
        driver = _start_mid_decode(tmp_path, argv)
        driver.kill()
        driver.wait()
    else:
        driver = _start_driver(tmp_path, KILL_POINTS[point], argv)
        try:
            driver.wait(timeout=120)
        finally:
            driver.kill()
        assert driver.returncode == -signal.SIGKILL, _log(tmp_path)[-3000:]
    _wait_for(lambda: not _live_session_members(driver.pid), SIGNAL_TIMEOUT, "the workers to end")
    if point in ("sigkill-between-manifest-and-report", "sigkill-during-materialize-copy"):
        assert (output / INCOMPLETE_FILE).exists()  # the outputs already there are marked as unfinished
    _select(*argv)
    assert _outputs(output) == _outputs(reference_run)
    assert _tree_files(output / "subset") == _tree_files(reference_run / "subset")
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in reference_run.iterdir())
    assert not (output / INCOMPLETE_FILE).exists()
