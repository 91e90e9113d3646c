"""The start-up version check: requirements.txt's lower bounds, enforced with one line that names the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from roadseg_utils import versions
from roadseg_utils.versions import MINIMUM_VERSIONS, check_versions, version_problem

REPO = Path(__file__).resolve().parent.parent


def test_minimum_versions_are_the_requirements_lower_bounds():
    bounds = dict(re.findall(r"^([A-Za-z0-9_-]+)>=([0-9.]+)", (REPO / "requirements.txt").read_text(), re.MULTILINE))
    assert {name: bounds[name] for name in MINIMUM_VERSIONS} == MINIMUM_VERSIONS


@pytest.mark.parametrize(("installed", "too_old"), [
    ("1.2.1", True), ("1.3.0", False), ("1.16.0", False), ("1.3.0rc1", False), ("0.34.2", True),
])
def test_version_problem_compares_releases(monkeypatch, installed, too_old):
    monkeypatch.setattr(versions, "version", lambda package: installed)
    problem = version_problem("accelerate", "1.3.0")
    if too_old:
        assert problem == (f"accelerate {installed} is installed, but roadseg needs accelerate>=1.3.0: "
                           "pip install -U 'accelerate>=1.3.0'")
    else:
        assert problem is None


def test_a_torch_local_build_tag_counts_as_its_release(monkeypatch):
    monkeypatch.setattr(versions, "version", lambda package: "2.6.0+cu124")
    assert version_problem("torch", "2.6") is None


def test_check_versions_exits_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(versions, "version", lambda package: "1.2.1" if package == "accelerate" else "99.0")
    with pytest.raises(SystemExit) as exit_info:
        check_versions("run_finetune.py")
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["run_finetune.py: error: accelerate 1.2.1 is installed, but roadseg needs accelerate>=1.3.0: "
                     "pip install -U 'accelerate>=1.3.0'"]


@pytest.mark.parametrize("script", ["run_finetune.py", "run_eval.py", "run_selection.py"])
def test_each_script_stops_on_an_old_accelerate_before_any_work(script, tmp_path):
    # A distribution's metadata earlier on sys.path is the one importlib.metadata reports: an accelerate 1.2.1 as
    # pip would leave it (on Kaggle or Colab), as far as the version check can tell.
    shadow = tmp_path / "shadow"
    (shadow / "accelerate-1.2.1.dist-info").mkdir(parents=True)
    (shadow / "accelerate-1.2.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: accelerate\n"
                                                                    "Version: 1.2.1\n")
    env = {**os.environ, "PYTHONPATH": str(shadow), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"{script}: error: accelerate 1.2.1 is installed, but roadseg needs accelerate>=1.3.0: "
        "pip install -U 'accelerate>=1.3.0'"
    ]
    assert not (tmp_path / "out").exists()
