"""Fixtures of the fault-injection suite: small data trees, a saved tiny model, script runs, full and read-only disks.

Every case asserts one of the suite's promises: one error line naming the file and the problem with a non-zero
exit and no traceback, nothing half-written, no orphaned process, or a correct result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from roadseg_utils.labels import get_label_set
from roadseg_utils.modeling import load_image_processor, load_model
from roadseg_utils.synthetic import generate_synthetic_idd

REPO = Path(__file__).resolve().parents[2]
LEVEL3 = get_label_set("idd-level3")
SMALL_SIZE = (48, 80)


def run_script(script: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts (``run_eval.py``, ``-m roadseg_utils.synthetic``, ...) to completion."""
    command = [sys.executable, *script.split(), *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A non-zero exit, no traceback, and an ``error:`` line holding every needle; returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"exit 0 where an error was expected:\n{output[-2000:]}"
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got {lines}:\n{result.stderr[-2000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def make_tree(root: Path, num_images: int = 12, num_sequences: int = 3, size: tuple[int, int] = SMALL_SIZE,
              seed: int = 0) -> Path:
    """A small synthetic IDD tree (train split) under ``root``."""
    generate_synthetic_idd(root, num_images=num_images, num_sequences=num_sequences, image_size=size, seed=seed,
                           workers=1)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    """A fresh 12-image synthetic IDD tree of 48x80 frames that a test may damage."""
    return make_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny level-3 Mask2Former with a small image processor (read-only use: copy it to change it)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    load_model("tiny", LEVEL3).save_pretrained(folder)
    load_image_processor("tiny", shortest_edge=48).save_pretrained(folder)
    return folder


@contextmanager
def mounted_tmpfs(size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs (a full disk at ``size``), optionally read-only; the test is skipped where mounting is denied."""
    where = Path(f"/tmp/roadseg-faults-{uuid.uuid4().hex[:8]}")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        where.rmdir()
