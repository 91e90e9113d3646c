"""The quick-start notebook runs top to bottom on tiny synthetic scenes; the Accelerate config is a valid one."""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path

import nbformat
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType
from nbclient import NotebookClient

from roadseg_utils.selection import load_manifest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def parameters_cell_index(notebook: nbformat.NotebookNode) -> int:
    """Index of the one cell tagged ``parameters`` (the papermill convention)."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{NOTEBOOK}: expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    """Names assigned at the top level of a cell."""
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def with_parameters(notebook: nbformat.NotebookNode, overrides: dict[str, object]) -> nbformat.NotebookNode:
    """The notebook with a cell that reassigns ``overrides`` inserted after its parameters cell, as papermill does."""
    index = parameters_cell_index(notebook)
    unknown = set(overrides) - assigned_names(notebook.cells[index].source)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)
    return notebook


def outputs_of(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    """Every ``mime`` payload of the notebook's display and result outputs, in order."""
    return [output["data"][mime] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if mime in output.get("data", {})]


def test_committed_notebook_is_clean_and_valid():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), "stored outputs"
    parameters = notebook.cells[parameters_cell_index(notebook)].source
    assert "DATA_DIR" in assigned_names(parameters)
    assert notebook.metadata.kernelspec.name == "python3"


def test_notebook_runs_selection_finetuning_and_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADSEG_SKIP_INSTALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # One intra-op thread per process: on a small, shared CPU, torch's default of one per core oversubscribes the
    # cores and the spinning threads slow each step several-fold; the kernel's scripts inherit the setting.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output_root = tmp_path / "runs"
    overrides = {
        "DATA_DIR": None,
        "SYNTHETIC_DIR": str(tmp_path / "syn"),
        "NUM_SYNTHETIC": 40,
        "SYNTHETIC_SIZE": "90x160",
        "MODEL": "tiny-cityscapes",
        "NUM_IMAGES": 20,
        "MAX_STEPS": 4,
        "BATCH_SIZE": 2,
        "CROP": "64x128",
        "SAVE_STEPS": 2,
        "MIXED_PRECISION": "no",
        "NUM_OVERLAYS": 2,
        "NUM_WORKERS": 0,
        "OUTPUT_ROOT": str(output_root),
    }
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), overrides)
    # The kernel runs from the repository root, as on Kaggle/Colab after cloning; every output goes to tmp_path.
    client = NotebookClient(notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    assert (tmp_path / "syn" / "leftImg8bit" / "train").is_dir()
    _, rows = load_manifest(output_root / "selection" / "manifest.json")
    assert sum(row["selected"] for row in rows) == 20
    ft_dir = output_root / "ft"
    assert (ft_dir / "model.safetensors").is_file()
    # --save_steps 2 over 4 steps: the checkpoints a cut-off session resumes from.
    assert sorted(p.name for p in ft_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    trainer_state = json.loads((ft_dir / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == 4

    results = json.loads((output_root / "eval" / "eval_results.json").read_text())
    tables = [html for html in outputs_of(notebook, "text/html") if "mean_iou" in html]
    assert tables, "no metrics table among the outputs"
    assert f"{100 * results['mean_iou']:.2f}" in tables[0]
    assert "mean_iou_level1" in tables[0] and "frequency_weighted_iou" in tables[0]

    pictures = [base64.b64decode(png) for png in outputs_of(notebook, "image/png")]
    overlays = sorted((output_root / "eval" / "overlays").glob("*.png"))
    assert len(overlays) == 2
    assert all(overlay.read_bytes() in pictures for overlay in overlays), "overlays not shown inline"
    markdown = "\n".join(outputs_of(notebook, "text/markdown"))
    assert "Image selection report" in markdown and "selected 20" in markdown

    # The passes over the data show progress bars with a count and a rate in the notebook too.
    streams = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []) if output.get("output_type") == "stream")
    assert re.search(r"checking label maps: 100%.*? 40/40 .*?map/s", streams), streams[-2000:]
    assert re.search(r"evaluating: 100%.*?batch/s", streams), streams[-2000:]


def test_accelerate_config_is_single_node_multi_gpu_ddp_with_fp16():
    config = load_config_from_file(str(REPO / "accelerate_config.yaml"))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_machines, config.machine_rank, config.num_processes) == (1, 0, 2)
    assert config.mixed_precision == "fp16" and config.use_cpu is False

