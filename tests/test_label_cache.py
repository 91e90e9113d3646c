"""The shared label cache: selection, fine-tuning and evaluation decode each label map once, a changed file again;
progress bars in a non-terminal log; loader worker defaults."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_finetune
import run_selection
from roadseg_utils import parallel
from roadseg_utils.data import DataSourceArguments, LabelValueError, label_cache, load_split_records
from roadseg_utils.data.label_cache import CACHE_FILE, CACHE_FOLDER, label_cache_path
from roadseg_utils.labels import load_id2label_file
from roadseg_utils.synthetic import generate_synthetic_idd
from tests.faults.conftest import mounted_tmpfs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Every label map decoded in this process, by path."""
    paths: list[str] = []
    real = label_cache.label_map_counts

    def counting(path, level=3):
        paths.append(os.fspath(path))
        return real(path, level)

    monkeypatch.setattr(label_cache, "label_map_counts", counting)
    return paths


def _tree(root: Path, num_images: int = 12) -> Path:
    generate_synthetic_idd(root, num_images=num_images, num_sequences=3, image_size=(64, 128), seed=4, workers=1)
    generate_synthetic_idd(root, num_images=4, num_sequences=1, image_size=(64, 128), seed=4, split="val", workers=1)
    return root


def _label_maps(tree: Path) -> set[str]:
    return {str(p) for p in (tree / "gtFine").rglob("*_gtFine_labellevel3Ids.png")}


def test_selection_then_finetuning_decodes_each_label_map_once(tmp_path, decoded):
    tree = _tree(tmp_path / "scenes")
    run_selection.main(["--data_dir", str(tree), "--num_images", "4", "--output_dir", str(tmp_path / "sel"),
                        "--no_plots", "--num_workers", "1"])
    by_selection = list(decoded)
    run_finetune.main(["--model_name_or_path", "tiny", "--data_dir", str(tree), "--output_dir", str(tmp_path / "ft"),
                       "--selection_manifest", str(tmp_path / "sel" / "manifest.json"), "--max_steps", "1",
                       "--per_device_train_batch_size", "2", "--crop_size", "64x128", "--eval_strategy", "no",
                       "--save_strategy", "no", "--do_eval", "False", "--do_predict", "False",
                       "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--report_to", "none",
                       "--num_workers", "1"])
    # Selection decoded the train pool; fine-tuning only the validation folder it had not seen.
    assert set(by_selection) == {p for p in _label_maps(tree) if "/train/" in p}
    assert sorted(decoded) == sorted(_label_maps(tree))  # every map, none twice
    assert (tree / CACHE_FOLDER / CACHE_FILE).is_file()


def test_second_start_decodes_nothing_and_a_replaced_map_is_decoded_again(tmp_path, decoded):
    tree = _tree(tmp_path / "scenes")
    args = DataSourceArguments(data_dir=str(tree), num_workers=1)
    first = load_split_records(args, seed=1)
    assert sorted(decoded) == sorted(_label_maps(tree))
    decoded.clear()
    second = load_split_records(args, seed=1)
    assert decoded == []
    for split, result in first.items():
        assert [r.path for r in second[split].records] == [r.path for r in result.records]
        assert np.array_equal(second[split].histograms, result.histograms)
        assert second[split].sizes == result.sizes == [(64, 128)] * len(result.records)
    # Replaced by a copy of the same size and times: the inode and ctime tell it apart.
    mask = sorted(_label_maps(tree))[0]
    info = os.stat(mask)
    shutil.copy2(mask, mask + ".new")
    os.replace(mask + ".new", mask)
    os.utime(mask, ns=(info.st_atime_ns, info.st_mtime_ns))
    load_split_records(args, seed=1)
    assert decoded == [mask]


def test_saving_removes_temporaries_of_killed_runs_but_not_of_running_ones(tmp_path):
    tree = _tree(tmp_path / "scenes", num_images=4)
    folder = tree / CACHE_FOLDER
    folder.mkdir()
    killed, running = folder / f".{CACHE_FILE}.{'a' * 32}.tmp", folder / f".{CACHE_FILE}.{'b' * 32}.tmp"
    for leftover in (killed, running):
        leftover.write_bytes(b"partial")
    old = time.time() - label_cache.STALE_TEMPORARY_S - 60
    os.utime(killed, (old, old))
    load_split_records(DataSourceArguments(data_dir=str(tree), num_workers=1), seed=0)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CACHE_FILE, running.name])


def _flat_pair(folder: Path, name: str, values: list[int]) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(folder / "images" / f"{name}.png")
    label = np.resize(np.array(values, np.uint8), (8, 12))
    Image.fromarray(label).save(folder / "masks" / f"{name}.png")


def test_label_values_are_checked_against_each_runs_label_set_from_the_cache(tmp_path, decoded):
    for i in range(4):
        _flat_pair(tmp_path / "flat", f"f{i}", [0, 1] if i != 2 else [0, 5])
    args = DataSourceArguments(data_dir=str(tmp_path / "flat"), image_dir="images", mask_dir="masks",
                               num_workers=1, train_fraction=1.0, val_fraction=0.0, test_fraction=0.0)
    load_split_records(args, seed=0)  # idd-level3: value 5 is a class
    assert len(decoded) == 4
    names = tmp_path / "two_classes.json"
    names.write_text(json.dumps({"0": "road", "1": "sky"}))
    decoded.clear()
    with pytest.raises(LabelValueError, match=r"f2\.png.*label values 5 outside"):
        load_split_records(args, load_id2label_file(names), seed=0)
    assert decoded == []  # refused from the cached histogram


def test_read_only_tree_keeps_its_cache_under_the_datasets_cache(tmp_path, monkeypatch, decoded):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    with mounted_tmpfs("8m") as mount:
        tree = _tree(mount / "scenes", num_images=4)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        args = DataSourceArguments(data_dir=str(tree), num_workers=1)
        cache = label_cache_path(args)
        assert cache.is_relative_to(tmp_path / "hf")
        load_split_records(args, seed=0)
        decoded.clear()
        load_split_records(args, seed=0)
        assert decoded == [] and cache.is_file() and not (tree / CACHE_FOLDER).exists()


def test_progress_bar_shows_count_and_rate_in_a_non_terminal_log(tmp_path):
    tree = _tree(tmp_path / "scenes")
    log = tmp_path / "selection.log"
    with open(log, "w") as stream:
        subprocess.run([sys.executable, str(REPO / "run_selection.py"), "--data_dir", str(tree), "--num_images", "4",
                        "--output_dir", str(tmp_path / "sel"), "--no_plots", "--num_workers", "1"],
                       stdout=stream, stderr=subprocess.STDOUT, check=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert re.search(r"checking label maps: 100%\S* 12/12 \[[0-9:]+<[0-9:]+, +[0-9.]+ ?map/s\]", text), text


@pytest.mark.parametrize(("cores", "local_processes", "expected"), [(2, None, 2), (16, None, 8), (16, "4", 4),
                                                                    (2, "2", 1), (1, "4", 1)])
def test_loader_workers_share_the_usable_cores_among_the_nodes_processes(monkeypatch, cores, local_processes,
                                                                         expected):
    monkeypatch.setattr(parallel, "usable_cores", lambda: cores)
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert parallel.default_loader_workers() == expected
