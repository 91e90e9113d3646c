"""Every shell command of README.md runs as written, or is listed here with the reason it cannot run on a CPU offline.

A ```bash block whose fence follows the line ``<!-- readme-check: run -->`` is run as a bash script, in README order,
in one temporary folder that links to the scripts, so later blocks read what earlier ones wrote (data/syn, runs/ft).
Every command of an unmarked block must start with a key of NOT_RUN, and every key must still match a command: a new
README command cannot stay unclassified, and a removed one cannot leave its excuse behind.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUN_MARKER = "<!-- readme-check: run -->"
SHELL_LANGUAGES = {"bash", "sh", "shell", "zsh", "console"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
# What the README's commands name from the repository, linked into the workspace as a clone would hold them.
REPO_ENTRIES = ("run_selection.py", "run_finetune.py", "run_eval.py", "roadseg_utils", "accelerate_config.yaml")
BLOCK_TIMEOUT_S = 300
# The synthetic generator writes byte-identical files for the same arguments, and the README repeats its command in
# each section so that each can be followed alone; running it again only costs time (~15 s for 300 scenes).
REPEATABLE_PREFIXES = ("python -m roadseg_utils.synthetic ",)
# The files each tool promises under its --output_dir.
PROMISED_FILES: dict[str, tuple[str, ...]] = {
    "roadseg_utils.synthetic": ("leftImg8bit/train", "gtFine/train"),
    "run_selection.py": ("manifest.json", "manifest.csv", "report.md"),
    "run_finetune.py": ("model.safetensors", "config.json", "preprocessor_config.json", "all_results.json",
                        "README.md"),
    "run_eval.py": ("eval_results.json", "eval_report.md", "confusion_matrix.png"),
}

IDD_AND_HUB = "needs the real IDD tree and the Hub checkpoint facebook/mask2former-swin-small-cityscapes-semantic"
# Commands of unmarked blocks, by the leading text of the command (whitespace collapsed), with why they cannot run
# here. A command takes the reason of the longest key it starts with.
NOT_RUN: dict[str, str] = {
    "make demo": "the Makefile's 5-minute demo; the marked blocks run the same scripts on the same synthetic scenes",
    "make test": "runs the whole test suite, this test included",
    "python -m roadseg_utils.pretrain --seed 0": "rebuilds the packaged tiny-cityscapes (13 minutes on 2 cores); "
        "tests/test_pretrain.py runs the same script for 2 steps",
    "python run_selection.py --data_dir data/idd ": "needs the real IDD tree in data/idd",
    "accelerate launch run_selection.py --data_dir data/idd ": "needs the real IDD tree in data/idd and GPUs",
    "python -m benchmarks.selection_study": "fine-tunes eight models, about 19 minutes on 2 cores (BENCHMARKS.md)",
    "python -m benchmarks.transfer": "fine-tunes twelve models, about 30 minutes on 2 cores (BENCHMARKS.md)",
    "python -m benchmarks.recipe": "fine-tunes two models per recipe variant, about 2.5 minutes each on 2 cores "
        "(BENCHMARKS.md)",
    "python run_selection.py --data_dir data/idd --num_images 1500 --output_dir runs/sel --push_to_hub":
        "needs the real IDD tree in data/idd and the Hub (with a token) to publish",
    "python run_finetune.py --data_dir data/idd ": IDD_AND_HUB + "; its '...' stands for the user's other options",
    "python run_selection.py selection_args.json": "reads the user's own argument file",
    "python run_finetune.py --data_dir /data/idd20k ": IDD_AND_HUB,
    "accelerate launch run_finetune.py --data_dir /data/idd20k ": IDD_AND_HUB + ", and GPUs",
    "python run_finetune.py config.json": "reads the user's own argument file",
    "python run_eval.py --model_name_or_path runs/ft --data_dir /data/idd20k ": "needs the real IDD val folder",
    "python run_eval.py --model_name_or_path runs/ft --image_dir imgs --mask_dir masks ":
        "needs the user's own image and mask folders",
    "python run_eval.py eval.json": "reads the user's own argument file",
    "accelerate launch run_eval.py --model_name_or_path runs/ft --data_dir data/syn ":
        "meant for several GPUs: without one it is the run_eval.py command above again (one process, ~16 s); the "
        "two-process CPU launch of run_eval.py runs in tests/test_distributed.py",
    "DATA=/path/to/idd20k": "a placeholder for the user's IDD folder",
    "python run_selection.py --data_dir $DATA ": "needs the real IDD tree ($DATA)",
    'ARGS="--model_name_or_path facebook/mask2former-swin-small-cityscapes-semantic --data_dir $DATA ':
        "the arguments of the GPU commands in the table below it: the Hub checkpoint and the real IDD tree",
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 ":
        "covered by tests/test_distributed.py (the same launch line, on 24 scenes); here two gloo processes on the "
        "300 scenes would add ~40 s, and the cheap 2-process launches of the block before run here",
    "python run_finetune.py --data_dir /data/idd --output_dir runs/idd --bf16": IDD_AND_HUB + ", and a GPU",
    "python run_finetune.py --data_dir /data/idd --output_dir runs/idd --fp16": IDD_AND_HUB + ", and a GPU",
    "hf auth login": "needs the Hub and the user's token",
    "python run_finetune.py --data_dir /data/idd --output_dir runs/idd --push_to_hub ":
        IDD_AND_HUB + ", and the Hub (with a token) to publish",
    "python run_eval.py --model_name_or_path runs/idd --data_dir /data/idd --output_dir runs/idd_test --push_to_hub ":
        "needs the real IDD tree, the model runs/idd trained on it, and the Hub (with a token) to publish",
}


@dataclass(frozen=True)
class ShellBlock:
    """One fenced shell block of the README: its opening fence's line, whether it is marked to run, its commands."""

    line: int
    marked: bool
    commands: tuple[str, ...]


@dataclass
class Workspace:
    """The folder the marked blocks run in, their environment, and what has run there so far."""

    root: Path
    env: dict[str, str]
    ran_blocks: set[int] = field(default_factory=set)
    failed_blocks: set[int] = field(default_factory=set)
    ran_commands: set[str] = field(default_factory=set)


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` outside quotes at the start or after whitespace."""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def split_commands(body: list[str]) -> list[str]:
    """The commands of a block's lines: continued lines joined as bash joins them, comments and blank lines dropped."""
    logical_lines: list[str] = []
    pending = ""
    for line in body:
        text = pending + line
        # bash drops a backslash-newline pair, also inside double quotes (ARGS="... \ ..."), but not in a comment.
        if text.endswith("\\") and strip_comment(text) == text:
            pending = text[:-1]
            continue
        logical_lines.append(text)
        pending = ""
    if pending:
        logical_lines.append(pending)
    return [command for command in (strip_comment(line).strip() for line in logical_lines) if command]


def readme_shell_blocks(text: str) -> list[ShellBlock]:
    """Every fenced shell block of ``text``, in order, with its run marker and commands."""
    lines = text.splitlines()
    blocks: list[ShellBlock] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, language = match.group(1), match.group(2).lower()
        end = index + 1
        while end < len(lines) and not re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[end]):
            end += 1
        if language in SHELL_LANGUAGES:
            marked = index > 0 and lines[index - 1].strip() == RUN_MARKER
            blocks.append(ShellBlock(index + 1, marked, tuple(split_commands(lines[index + 1:end]))))
        index = end + 1
    return blocks


def normalized(command: str) -> str:
    """``command`` with every run of whitespace made one space, as NOT_RUN's keys are written."""
    return " ".join(command.split())


def not_run_key(command: str) -> str | None:
    """The longest NOT_RUN key ``command`` starts with, or None."""
    text = normalized(command)
    return max((key for key in NOT_RUN if text.startswith(key)), key=len, default=None)


def output_dir_and_promised_files(command: str) -> tuple[Path, tuple[str, ...]] | None:
    """The --output_dir of a synthetic, selection, fine-tuning or evaluation command and the files it promises there."""
    words = shlex.split(command)
    tool = next((Path(word).name for word in words if Path(word).name in PROMISED_FILES), None)
    if tool is None or "--output_dir" not in words:
        return None
    return Path(words[words.index("--output_dir") + 1]), PROMISED_FILES[tool]


def block_script(block: ShellBlock, ran_commands: set[str]) -> str:
    """A bash script of the block's commands, each echoed first; a repeatable command that already ran is skipped."""
    lines = ["set -euo pipefail"]
    for command in block.commands:
        if command in ran_commands and command.startswith(REPEATABLE_PREFIXES):
            lines.append(f"echo {shlex.quote('# ran before, skipped: ' + command)}")
            continue
        lines += [f"echo {shlex.quote('$ ' + command)}", command]
    return "\n".join(lines) + "\n"


def run_script(script: str, workspace: Workspace) -> tuple[int | None, str]:
    """Run ``script`` with bash in the workspace; the exit status (None on timeout) and the merged output."""
    with subprocess.Popen(["bash", "-c", script], cwd=workspace.root, env=workspace.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # The session holds bash and every process it started (accelerate's ranks included).
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return None, output
    return process.returncode, output


def run_block(block: ShellBlock, workspace: Workspace) -> None:
    """Run one marked block in the workspace and check its exit status and the files its commands promise."""
    script = block_script(block, workspace.ran_commands)
    status, output = run_script(script, workspace)
    if status not in (0, None) and "(SIGABRT)" in output and "accelerate launch" in script:
        # A gloo rank rarely aborts in C++ as an evaluation starts (see tests/test_distributed.py). Rerunning the same
        # commands is what the README says to do: finished runs are done, an interrupted one resumes.
        warnings.warn(f"README block at line {block.line}: a rank aborted; rerunning it once:\n{output[-3000:]}",
                      stacklevel=2)
        status, output = run_script(script, workspace)
    workspace.ran_blocks.add(block.line)
    shown = "\n".join(block.commands)
    if status != 0:
        workspace.failed_blocks.add(block.line)
        outcome = f"timed out after {BLOCK_TIMEOUT_S} s" if status is None else f"exited with status {status}"
        pytest.fail(f"README block at line {block.line} {outcome}:\n{shown}\n--- last output ---\n{output[-5000:]}")
    workspace.ran_commands.update(block.commands)
    promises = [promise for promise in map(output_dir_and_promised_files, block.commands) if promise]
    missing = [str(output_dir / name) for output_dir, names in promises for name in names
               if not (workspace.root / output_dir / name).exists()]
    incomplete = [str(output_dir) for output_dir, _ in promises
                  if (workspace.root / output_dir / "RUN_INCOMPLETE").exists()]
    if missing or incomplete:
        workspace.failed_blocks.add(block.line)
        pytest.fail(f"README block at line {block.line} exited with 0 but left missing files {missing} and "
                    f"RUN_INCOMPLETE markers in {incomplete}:\n{shown}\n--- last output ---\n{output[-3000:]}")


BLOCKS = readme_shell_blocks(README.read_text(encoding="utf-8"))
MARKED_BLOCKS = [block for block in BLOCKS if block.marked]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """An empty folder holding links to the scripts, and an environment that is offline, CPU-only and quiet."""
    root = tmp_path_factory.mktemp("readme")
    for name in REPO_ENTRIES:
        (root / name).symlink_to(REPO / name)
    # Accelerate settings of the caller's environment would change what `accelerate launch` does.
    env = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    env.update({
        # `python` and `accelerate` are the venv's, as after `make install` and activating it.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # No Hub token, cache or `accelerate config` of the caller's: its default_config.yaml would be read.
        "HF_HOME": str(root.parent / "hf_home"),
        # These are the CPU commands; a GPU would change what they run.
        "CUDA_VISIBLE_DEVICES": "",
        # Two intra-op threads per process only spin against each other on a small CPU (see tests/conftest.py).
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("HF_TOKEN", None)
    return Workspace(root, env)


def test_commands_join_continuations_and_drop_comments() -> None:
    """The parser joins ``\\`` lines as bash does, keeps quoted ``#`` and drops comments and blank lines."""
    body = ["# a comment", 'ARGS="--a 1 \\', '      --b #2"   # trailing', "", "python x.py $ARGS \\", "    --c 3"]
    assert split_commands(body) == ['ARGS="--a 1       --b #2"', "python x.py $ARGS     --c 3"]


def test_run_markers_sit_just_above_shell_blocks() -> None:
    """Every readme-check marker is exactly RUN_MARKER, on the line right before a shell block's fence."""
    lines = README.read_text(encoding="utf-8").splitlines()
    marked_lines = {block.line - 1 for block in MARKED_BLOCKS}
    markers = [number for number, line in enumerate(lines, start=1)
               if line.lstrip().startswith("<!--") and "readme-check" in line]
    stray = [f"line {number}: {lines[number - 1]}" for number in markers
             if lines[number - 1].strip() != RUN_MARKER or number not in marked_lines]
    assert not stray, f"readme-check markers not on the line before a ```bash fence: {stray}"
    assert MARKED_BLOCKS, f"no block of README.md is marked {RUN_MARKER}"


def test_every_readme_command_is_run_or_listed_as_not_run() -> None:
    """Unmarked commands each match a NOT_RUN key, marked ones none, and every key still matches a command."""
    unlisted = [f"line {block.line}: {command}" for block in BLOCKS if not block.marked
                for command in block.commands if not_run_key(command) is None]
    assert not unlisted, (f"README commands that neither run here (mark their block {RUN_MARKER}) nor are listed in "
                          f"NOT_RUN with the reason they cannot: {unlisted}")
    listed_but_marked = [f"line {block.line}: {command}" for block in MARKED_BLOCKS
                         for command in block.commands if not_run_key(command) is not None]
    assert not listed_but_marked, f"commands of marked blocks that NOT_RUN says cannot run: {listed_but_marked}"
    used_keys = {not_run_key(command) for block in BLOCKS if not block.marked for command in block.commands}
    stale = sorted(set(NOT_RUN) - used_keys)
    assert not stale, f"NOT_RUN keys that no unmarked README command starts with (remove them): {stale}"


@pytest.mark.parametrize("block", MARKED_BLOCKS, ids=[f"line{block.line}" for block in MARKED_BLOCKS])
def test_marked_readme_block_runs(block: ShellBlock, workspace: Workspace) -> None:
    """The block's commands exit with status 0 after the earlier marked blocks, and write what they promise."""
    earlier = MARKED_BLOCKS[:MARKED_BLOCKS.index(block)]
    failed = [other.line for other in earlier if other.line in workspace.failed_blocks]
    if failed:
        pytest.skip(f"the README block at line {failed[0]} failed, and this one may need its outputs")
    # Run alone (pytest -k), a block still finds what the blocks before it write.
    for other in earlier:
        if other.line not in workspace.ran_blocks:
            run_block(other, workspace)
    run_block(block, workspace)
