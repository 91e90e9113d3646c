"""Fault cases of run_eval.py and model loading: bad arguments, folders, label sets, models, data, kills and races.

Each case builds the bad input for real (a read-only disk, a truncated safetensors file, a pickle that would run a
command, a process killed with SIGKILL, a second run holding the lock) and asserts the promise: one error line
naming the file or option and the problem, a non-zero exit, no traceback, nothing half-written, no orphaned
process, or a correct result. Cases that the check must catch before the model or the data is read also prove it:
the loading functions are replaced by ones that fail the test if called.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_eval
from roadseg_utils import modeling
from roadseg_utils.data import dataset_column
from roadseg_utils.evaluation import EvalInputError, build_results
from roadseg_utils.labels import LEVEL3_NAMES
from roadseg_utils.metrics import compute_segmentation_metrics
from roadseg_utils.modeling import ModelLoadError, load_model
from roadseg_utils.output_dir import INCOMPLETE_FILE, LOCK_FILE, RUN_FILE
from tests.faults.conftest import LEVEL3, REPO, make_tree, mounted_tmpfs, run_script

ALL_TEST = ("--train_fraction", "0", "--val_fraction", "0", "--test_fraction", "1")
NUM_IMAGES = 12
SEED = 11  # the seed of the kill points: rerun a failure with the same one
# Runs run_eval.py in this process's place, then kills or stops itself at a chosen point (argv: mode, n, args...).
HOOK = '''
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
mode, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen, marked, stopped = 0, False, False

def counted(real):
    def call(source, target, *rest, **options):
        global seen, marked
        target = str(target)
        if mode == "scoring" and ".partial" in target and target.endswith("Ids.png"):
            seen += 1
        elif mode == "moves" and marked:
            seen += 1
        if n and seen == n:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(source, target, *rest, **options)
        marked = marked or target.endswith("RUN_INCOMPLETE")
        return result
    return call

os.replace, os.rename = counted(os.replace), counted(os.rename)
if mode == "stop-after-lock":
    from roadseg_utils.output_dir import OutputLock
    locked = OutputLock.__enter__
    def enter(self):
        global stopped
        result = locked(self)
        if not stopped:  # the first lock is --output_dir's
            stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)
        return result
    OutputLock.__enter__ = enter
sys.argv = ["run_eval.py", *args]
runpy.run_path("run_eval.py", run_name="__main__")
'''


# ----------------------------------------------------------------------------------------------------- helpers


def eval_error(capsys, *args: object, code: int = 1) -> str:
    """Run run_eval.main in this process; assert exit ``code``, no traceback, one error line; return that line."""
    with pytest.raises(SystemExit) as info:
        run_eval.main([str(arg) for arg in args])
    assert info.value.code == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1, captured.err[-2000:]
    return lines[0]


def eval_args(model: Path, data: Path, out: Path, *extra: object) -> list[str]:
    """The arguments of a quick run over all 12 images of a tree."""
    return [str(a) for a in ("--model_name_or_path", model, "--data_dir", data, "--output_dir", out, *ALL_TEST,
                             "--dataloader_num_workers", "0", "--batch_size", "2", *extra)]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def no_model_or_data(monkeypatch):
    """Fail the test if the run reaches the model or the data: the error had to come first."""
    def reached(*args, **kwargs):
        pytest.fail("the run read the model or the data before refusing its input")

    for name in ("choose_label_set", "load_model", "load_segmentation_dataset"):
        monkeypatch.setattr(run_eval, name, reached)


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the run loads the data (for errors the model's config alone must reveal)."""
    monkeypatch.setattr(run_eval, "load_segmentation_dataset",
                        lambda *a, **k: pytest.fail("the run read the data before refusing the model"))


@pytest.fixture(scope="module")
def data12(tmp_path_factory) -> Path:
    """A 12-image tree that no case changes."""
    return make_tree(tmp_path_factory.mktemp("eval_faults") / "data")


# ------------------------------------------------------------------------- output folder and export, before work


def _file(tmp: Path) -> Path:
    (tmp / "a_file").write_text("keep me")
    return tmp / "a_file"


OUTPUT_PLACES = {
    "output-dir-is-a-file": (lambda tmp: (_file(tmp), None), ("a_file", "is a file")),
    "output-dir-uncreatable": (lambda tmp: (_file(tmp) / "sub", None), ("a_file/sub", "cannot create")),
    "export-is-a-file": (lambda tmp: (tmp / "ev", _file(tmp)), ("--export_predictions", "a_file", "is a file")),
    "export-uncreatable": (lambda tmp: (tmp / "ev", _file(tmp) / "preds"),
                           ("--export_predictions", "a_file/preds", "cannot create")),
    "export-is-the-output-dir": (lambda tmp: (tmp / "ev", tmp / "ev"), ("--export_predictions", "would replace")),
    "export-holds-the-output-dir": (lambda tmp: (tmp / "runs" / "ev", tmp / "runs"), ("would replace",)),
}


@pytest.mark.parametrize("case", list(OUTPUT_PLACES), ids=list(OUTPUT_PLACES))
def test_unusable_output_places_stop_before_the_model_is_read(case, capsys, tmp_path, tiny_model_dir, data12,
                                                              no_model_or_data):
    make_places, needles = OUTPUT_PLACES[case]
    out, export = make_places(tmp_path)
    extra = ("--export_predictions", export) if export else ()
    line = eval_error(capsys, *eval_args(tiny_model_dir, data12, out, *extra))
    assert line.startswith("run_eval.py: error: ") and all(needle in line for needle in needles), line
    if (tmp_path / "a_file").exists():
        assert (tmp_path / "a_file").read_text() == "keep me"
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("what", ["output-dir", "export"], ids=["output-dir-on-read-only-disk",
                                                                "export-on-read-only-disk"])
def test_read_only_disk_stops_before_the_model_is_read(what, capsys, tmp_path, tiny_model_dir, data12,
                                                       no_model_or_data):
    with mounted_tmpfs("1m", read_only=True) as disk:
        out, export = (disk / "ev", tmp_path / "preds") if what == "output-dir" else (tmp_path / "ev", disk / "p")
        line = eval_error(capsys, *eval_args(tiny_model_dir, data12, out, "--export_predictions", export))
        assert str(disk) in line and ("cannot create" in line or "cannot write" in line), line
    assert not (tmp_path / "preds").exists()


def test_output_dir_that_is_the_model_folder_is_refused(capsys, tmp_path, tiny_model_dir, data12, no_model_or_data):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    before = files_of(model)
    line = eval_error(capsys, *eval_args(model, data12, model))
    assert "is the model folder" in line and str(model) in line
    assert files_of(model) == before and not (model / LOCK_FILE).exists()


def test_output_dir_of_a_fine_tuning_run_is_refused(capsys, tmp_path, tiny_model_dir, data12, no_model_or_data):
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / RUN_FILE).write_text(json.dumps({"script": "run_finetune.py", "data": "elsewhere"}))
    (folder / "all_results.json").write_text("{}")
    before = files_of(folder)
    line = eval_error(capsys, *eval_args(tiny_model_dir, data12, folder))
    assert str(folder) in line and "holds the outputs of run_finetune.py" in line
    assert files_of(folder) == before


def test_model_card_into_a_read_only_model_folder_stops_before_work(capsys, tmp_path, tiny_model_dir, data12,
                                                                    no_model_or_data):
    with mounted_tmpfs("32m") as disk:
        model = copy_model(tiny_model_dir, disk / "model")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        line = eval_error(capsys, *eval_args(model, data12, tmp_path / "ev", "--update_model_card"))
        assert "--update_model_card" in line and str(model) in line and "cannot write" in line
    assert not (tmp_path / "ev").exists()


def test_export_into_a_folder_of_other_files_is_refused_and_they_stay(capsys, tmp_path, tiny_model_dir, tree,
                                                                      no_model_or_data):
    before = files_of(tree)
    line = eval_error(capsys, *eval_args(tiny_model_dir, tree, tmp_path / "ev", "--export_predictions", tree))
    assert str(tree) in line and "not an exported prediction" in line
    assert files_of(tree) == before and not (tree.parent / "data.partial").exists()


# ------------------------------------------------------------------------------------------------ bad arguments

BAD_ARGUMENTS = {
    "batch-size-zero": (("--batch_size", "0"), ("--batch_size", "at least 1")),
    "batch-size-negative": (("--batch_size", "-3"), ("--batch_size", "-3")),
    "split-unknown": (("--split", "holdout"), ("--split", "holdout")),
    "export-level-5": (("--export_level", "5"), ("--export_level", "5")),
    "working-size-zero": (("--working_size", "0"), ("--working_size",)),
    "working-size-negative": (("--working_size", "-1"), ("--working_size",)),
    "eval-shortest-edge-negative": (("--eval_shortest_edge", "-2"), ("--eval_shortest_edge",)),
    "fractions-not-summing-to-1": (("--test_fraction", "0.5"), ("sum to 1",)),
    "on-bad-sample-unknown": (("--on_bad_sample", "ignore"), ("--on_bad_sample", "ignore")),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS), ids=list(BAD_ARGUMENTS))
def test_bad_argument_is_one_line_before_any_work(case, capsys, tmp_path, tiny_model_dir, data12, no_model_or_data):
    extra, needles = BAD_ARGUMENTS[case]
    argv = eval_args(tiny_model_dir, data12, tmp_path / "ev", *extra)
    with pytest.raises(SystemExit) as info:
        run_eval.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert info.value.code not in (0, None) and len(lines) == 1 and "Traceback" not in captured.err
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert not (tmp_path / "ev").exists()


def test_unknown_tta_is_one_line(capsys, tmp_path, tiny_model_dir, data12, no_model_or_data):
    (tmp_path / "args.json").write_text(json.dumps({"model_name_or_path": str(tiny_model_dir), "tta": "rotate",
                                                    "data_dir": str(data12), "output_dir": str(tmp_path / "ev")}))
    line = eval_error(capsys, tmp_path / "args.json")
    assert "--tta" in line and "rotate" in line


def test_export_level_finer_than_the_model_stops_before_the_data(capsys, tmp_path, tiny_model_dir, data12, no_data):
    line = eval_error(capsys, *eval_args(tiny_model_dir, data12, tmp_path / "ev", "--export_level", "4",
                                         "--export_predictions", tmp_path / "preds"))
    assert "level-4" in line and "level-3 model" in line
    assert not (tmp_path / "preds").exists() and not (tmp_path / "preds.partial").exists()


ARGUMENT_FILES = {
    "args-file-not-json": ('{"output_dir": ', "not a readable JSON argument file"),
    "args-file-not-an-object": ('["--output_dir", "x"]', "expected a JSON object"),
    "args-file-unknown-key": ('{"model_name_or_path": "tiny", "output_dir": "x", "batchsize": 2}', "batchsize"),
    "args-file-missing": (None, "argument file not found"),
}


@pytest.mark.parametrize("case", list(ARGUMENT_FILES), ids=list(ARGUMENT_FILES))
def test_malformed_argument_file_is_named_in_one_line(case, capsys, tmp_path, no_model_or_data):
    text, problem = ARGUMENT_FILES[case]
    path = tmp_path / "eval_args.json"
    if text is not None:
        path.write_text(text)
    line = eval_error(capsys, path)
    assert problem in line and str(path) in line, line


# ----------------------------------------------------------------------------------------- label-set JSON files

LABEL_FILES = {
    "label-set-not-json": ('{"0": "road",', "not valid JSON"),
    "label-set-not-an-object": ('["road", "sky"]', "JSON object"),
    "label-set-non-integer-id": ('{"0": "road", "one": "sky"}', "must be integers"),
    "label-set-duplicate-id": ('{"0": "road", "1": "sky", "1": "car"}', "more than once"),
    "label-set-duplicate-name": ('{"0": "road", "1": "road"}', "more than one id"),
    "label-set-gap": ('{"0": "road", "2": "sky"}', "without gaps"),
    "label-set-256-classes": (json.dumps({str(i): f"c{i}" for i in range(256)}), "at most 255"),
    "label-set-missing-file": (None, "not found"),
}


@pytest.mark.parametrize("case", list(LABEL_FILES), ids=list(LABEL_FILES))
def test_malformed_label_set_file_is_named_in_one_line(case, capsys, tmp_path, tiny_model_dir, data12, no_data):
    text, problem = LABEL_FILES[case]
    path = tmp_path / "my_labels.json"
    if text is not None:
        path.write_text(text)
    for model in ("tiny", tiny_model_dir):  # a label set for the demo model, or one to check a saved model against
        line = eval_error(capsys, *eval_args(model, data12, tmp_path / "ev", "--label_set", path))
        assert str(path) in line and problem in line, line


# ---------------------------------------------------------------------------------------------- model folders


def _pickle_payload(folder: Path, marker: Path, legacy: bool) -> None:
    """Replace the weights by a pytorch_model.bin whose pickle would create ``marker`` when loaded."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "model.safetensors").unlink()
    state = {"class_predictor.weight": torch.zeros(2, 2), "hook": Payload()}
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)


def _truncate(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _bin_weights(folder: Path) -> None:
    model = load_model(str(folder), None)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def _corrupt_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"\x00\xff" * 16
    (folder / "model.safetensors").write_bytes(bytes(data))


def _config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(change(config))


def _missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BAD_MODELS = {
    # case: (damage(folder, marker), needles, caught from headers before the data is read)
    "pickle-payload-in-pytorch-model-bin": (lambda f, m: _pickle_payload(f, m, legacy=False),
                                            ("refused", "posix.system", "could run code"), False),
    "pickle-payload-legacy-format": (lambda f, m: _pickle_payload(f, m, legacy=True),
                                     ("refused", "posix.system"), False),
    "safetensors-truncated": (lambda f, m: _truncate(f / "model.safetensors", 0.6),
                              ("model.safetensors", "truncated"), True),
    "safetensors-header-corrupt": (lambda f, m: _corrupt_header(f), ("model.safetensors", "corrupt"), True),
    "safetensors-shard-missing": (lambda f, m: _missing_shard(f), ("model-00002-of-00002", "missing"), True),
    "pytorch-model-bin-truncated": (lambda f, m: (_bin_weights(f), _truncate(f / "pytorch_model.bin", 0.5)),
                                    ("pytorch_model.bin", "truncated"), True),
    "config-not-json": (lambda f, m: (f / "config.json").write_text('{"model_type": "mask2'),
                        ("config.json", "not readable JSON"), True),
    "config-not-mask2former": (lambda f, m: _config(f, lambda c: json.dumps({**c, "model_type": "bert"})),
                               ("config.json", "not a Mask2Former config", "bert"), True),
    "config-id2label-not-ids": (lambda f, m: _config(f, lambda c: json.dumps({**c, "id2label": {"road": 0}})),
                                ("config.json", "id2label"), True),
    "no-weights": (lambda f, m: (f / "model.safetensors").unlink(), ("no weights",), True),
    "folder-of-an-unfinished-run": (lambda f, m: (f / INCOMPLETE_FILE).write_text("run_finetune.py (pid 1)"),
                                    (INCOMPLETE_FILE, "did not finish"), True),
    "model-path-is-a-file": (lambda f, m: None, ("not a folder",), True),
}


@pytest.mark.parametrize("case", list(BAD_MODELS), ids=list(BAD_MODELS))
def test_bad_model_folder_is_one_line_for_eval_and_finetune(case, capsys, monkeypatch, tmp_path, tiny_model_dir,
                                                            data12):
    damage, needles, from_headers = BAD_MODELS[case]
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "PAYLOAD_RAN"
    damage(folder, marker)
    if case == "model-path-is-a-file":
        folder = folder / "config.json"
    if from_headers:
        monkeypatch.setattr(run_eval, "load_segmentation_dataset",
                            lambda *a, **k: pytest.fail("the data was read before the model folder was checked"))
    line = eval_error(capsys, *eval_args(folder, data12, tmp_path / "ev"))
    assert str(folder) in line and all(needle in line for needle in needles), line
    # run_finetune.py loads its starting model through the same function.
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), LEVEL3)
    assert "\n" not in str(info.value) and all(needle in str(info.value) for needle in needles)
    assert not marker.exists(), "the pickle's payload ran"
    assert files_of(tmp_path / "ev") == {}


def test_hub_id_while_offline_is_one_line_before_the_data(capsys, monkeypatch, tmp_path, data12, no_data):
    monkeypatch.setattr(modeling, "hub_is_reachable", lambda: False)
    line = eval_error(capsys, *eval_args("roadseg-tests/no-such-model", data12, tmp_path / "ev"))
    assert "cannot fetch 'roadseg-tests/no-such-model'" in line and "offline" in line


def test_the_pickle_payload_is_real_so_its_refusal_means_something(tmp_path, tiny_model_dir):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "PAYLOAD_RAN"
    _pickle_payload(folder, marker, legacy=False)
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # what a loader without the allow-list would do
    assert marker.exists()


@pytest.mark.parametrize("text", [None, '{"size": '], ids=["preprocessor-config-missing",
                                                          "preprocessor-config-not-json"])
def test_bad_image_processor_config_is_one_line_before_the_data(text, capsys, tmp_path, tiny_model_dir, data12,
                                                                no_data):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    if text is None:
        (folder / "preprocessor_config.json").unlink()
    else:
        (folder / "preprocessor_config.json").write_text(text)
    line = eval_error(capsys, *eval_args(folder, data12, tmp_path / "ev"))
    assert str(folder) in line and "preprocessor_config.json" in line


def test_label_set_differing_from_the_model_names_the_class(capsys, tmp_path, tiny_model_dir, data12, no_data):
    names = list(LEVEL3_NAMES)
    names[3] = "kerb"
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(dict(enumerate(names))))
    line = eval_error(capsys, *eval_args(tiny_model_dir, data12, tmp_path / "ev", "--label_set", path))
    assert "class 3 is 'non-drivable fallback' in the model, 'kerb' there" in line
    line = eval_error(capsys, *eval_args(tiny_model_dir, data12, tmp_path / "ev", "--label_set", "idd-level2"))
    assert "26 classes" in line and "16 classes" in line and "idd-level2" in line


# --------------------------------------------------------------------------------------------- silent results


def test_split_without_a_labelled_pixel_is_an_error_not_nan(capsys, tmp_path, tiny_model_dir, tree):
    for mask in tree.rglob("*_gtFine_labellevel3Ids.png"):
        Image.fromarray(np.full((48, 80), 255, np.uint8)).save(mask)
    line = eval_error(capsys, *eval_args(tiny_model_dir, tree, tmp_path / "ev"))
    assert str(tree) in line and ("255" in line or "labelled" in line), line
    assert files_of(tmp_path / "ev") == {}


def test_metrics_reached_without_a_labelled_pixel_refuse_to_report():
    matrix = np.zeros((26, 26), dtype=np.int64)
    metrics = compute_segmentation_metrics(matrix, LEVEL3.id2label, LEVEL3.coarser)
    assert np.isnan(metrics["mean_iou"])
    with pytest.raises(EvalInputError, match="no labelled pixel"):
        build_results(matrix, metrics, LEVEL3, {"data": "somewhere", "split": "test"})


def _damage_after_loading(monkeypatch, tree: Path, position: int) -> list[str]:
    """Truncate one test image once the split is loaded, so only a DataLoader worker finds it bad."""
    original = run_eval.load_segmentation_dataset
    victim: list[str] = []

    def load_then_damage(*args, **kwargs):
        splits = original(*args, **kwargs)
        victim.append(dataset_column(splits["test"], "path")[position])
        _truncate(tree / victim[0], 0.5)
        return splits

    monkeypatch.setattr(run_eval, "load_segmentation_dataset", load_then_damage)
    return victim


def test_image_bad_inside_a_worker_stops_with_one_line(capsys, monkeypatch, tmp_path, tiny_model_dir, tree):
    victim = _damage_after_loading(monkeypatch, tree, 5)
    args = eval_args(tiny_model_dir, tree, tmp_path / "ev", "--dataloader_num_workers", "1",
                     "--export_predictions", tmp_path / "preds")
    line = eval_error(capsys, *args)
    assert Path(victim[0]).name in line and "cannot read image" in line, line
    assert files_of(tmp_path / "ev") == {} and not (tmp_path / "preds").exists()
    assert not (tmp_path / "preds.partial").exists()


def test_image_bad_inside_a_worker_is_skipped_and_counted(capsys, monkeypatch, tmp_path, tiny_model_dir, tree):
    victim = _damage_after_loading(monkeypatch, tree, 5)
    results = run_eval.main(eval_args(tiny_model_dir, tree, tmp_path / "ev", "--dataloader_num_workers", "1",
                                      "--on_bad_sample", "skip", "--export_predictions", tmp_path / "preds",
                                      "--num_overlays", str(NUM_IMAGES)))
    assert results["skipped_images"] == victim and results["num_images"] == NUM_IMAGES - 1
    assert json.loads((tmp_path / "ev" / "eval_results.json").read_text())["skipped_images"] == victim
    assert "1 image(s) skipped as bad samples" in (tmp_path / "ev" / "eval_report.md").read_text()
    assert "1 skipped as bad samples" in capsys.readouterr().out
    assert len(list((tmp_path / "preds").glob("*/*.png"))) == NUM_IMAGES - 1
    assert len(list((tmp_path / "preds" / "ground_truth").rglob("*.png"))) == NUM_IMAGES - 1
    assert len(list((tmp_path / "ev" / "overlays").iterdir())) == NUM_IMAGES - 1


# ------------------------------------------------------------------------------ kills, reruns and a second run


@pytest.fixture(scope="module")
def workplace(tmp_path_factory, tiny_model_dir):
    """A folder where an earlier run (level-2 export, 3 overlays) was replaced by the reference run of these args.

    Returns (root, args, earlier files, reference files); `restore_earlier` puts the earlier run's files back.
    """
    root = tmp_path_factory.mktemp("workplace")
    data = make_tree(root / "data")
    out, preds = root / "ev", root / "preds"
    args = eval_args(tiny_model_dir, data, out, "--export_predictions", preds, "--num_overlays", "4")
    run_eval.main(eval_args(tiny_model_dir, data, out, "--export_predictions", preds, "--export_level", "2",
                            "--num_overlays", "3"))
    shutil.copytree(out, root / "earlier_ev")
    shutil.copytree(preds, root / "earlier_preds")
    earlier = (files_of(out), files_of(preds))
    run_eval.main(args)
    reference = (files_of(out), files_of(preds))
    return root, args, earlier, reference


def test_run_over_an_earlier_folder_replaces_its_outputs_whole(workplace):
    root, args, earlier, reference = workplace
    # Nothing of the earlier run (level-2 export, 3 overlays) is left beside this run's files.
    assert sorted(name for name in reference[0] if name.startswith("overlays/")) == [
        f"overlays/{rank:03d}_{frame}.png" for rank, frame in enumerate(("000000", "000004", "000007", "000011"))]
    # Each frame's prediction, its ground truth, and the export's README.md.
    assert len(reference[1]) == 2 * NUM_IMAGES + 1 and "README.md" in reference[1]
    assert all(name.endswith("_gtFine_labellevel3Ids.png") for name in reference[1] if name != "README.md")
    results = json.loads(reference[0]["eval_results.json"])
    assert results["export_level"] == 3 and results["num_images"] == NUM_IMAGES
    assert not any(p.name.endswith(".partial") or p.name == INCOMPLETE_FILE for p in root.rglob("*"))


def restore_earlier(root: Path) -> None:
    for name in ("ev", "preds", "preds.partial"):
        shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(root / "earlier_ev", root / "ev")
    shutil.copytree(root / "earlier_preds", root / "preds")


def run_hooked(root: Path, mode: str, n: int, args: list[str], tag: str) -> subprocess.CompletedProcess:
    hook = root / "hook.py"
    hook.write_text(HOOK)
    return run_script(str(hook), mode, str(n), *args, timeout=120, env={"ROADSEG_FAULT_TAG": tag})


def tagged_processes(tag: str) -> list[int]:
    """Processes (a killed run's DataLoader workers) whose environment holds ``tag``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"ROADSEG_FAULT_TAG={tag}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("phase", ["scoring", "moves"], ids=["sigkill-while-scoring", "sigkill-while-moving-in"])
def test_sigkill_then_rerun_gives_the_uninterrupted_outputs(phase, workplace, capsys):
    root, args, earlier, reference = workplace
    restore_earlier(root)
    # Scoring writes one exported prediction per image; the final moves are 2 for the export and 6 for the outputs.
    point = random.Random(f"{SEED}-{phase}").randint(1, NUM_IMAGES if phase == "scoring" else 8)
    tag = uuid.uuid4().hex
    killed = run_hooked(root, phase, point, [*args, "--dataloader_num_workers", "1"], tag)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    deadline = time.monotonic() + 20
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged_processes(tag) == [], "a DataLoader worker outlived the killed run"
    out, preds = root / "ev", root / "preds"
    if phase == "scoring":
        # The earlier run's outputs and export are whole and untouched; the partial export is named as such.
        assert (files_of(out), files_of(preds)) == earlier
        assert (root / "preds.partial").is_dir()
    else:
        # Mid-move the folder says that its files may mix two runs.
        assert (out / INCOMPLETE_FILE).is_file()
        assert set(files_of(preds)) in (set(earlier[1]), set(reference[1])) or not preds.exists()
    run_eval.main(args)
    assert (files_of(out), files_of(preds)) == reference
    assert not (root / "preds.partial").exists() and not (out / INCOMPLETE_FILE).exists()
    assert not (out / ".run_eval-staging").exists()
    capsys.readouterr()


def test_second_run_into_the_same_folder_is_refused_and_the_first_completes(workplace, capsys):
    root, args, earlier, reference = workplace
    restore_earlier(root)
    log = root / "first.log"
    hook = root / "hook.py"
    hook.write_text(HOOK)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as stream:
        first = subprocess.Popen([sys.executable, str(hook), "stop-after-lock", "0", *args], cwd=REPO,
                                 stdout=stream, stderr=stream, env=environment)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), log.read_text()[-2000:]
        line = eval_error(capsys, *args)
        assert str(root / "ev") in line and "run_eval.py (pid" in line and "is writing into this folder" in line
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    assert (files_of(root / "ev"), files_of(root / "preds")) == reference
