"""Training checkpoints a resumed run can trust: saved whole, found complete by their headers, failed saves named.

A run killed while the `Trainer` writes ``checkpoint-N`` leaves that folder partial: a file missing, or cut off.
Resuming from it would die with a traceback deep in safetensors or ``torch.load``, so `checkpoint_problem` checks
every file a resume reads without loading any of them: the safetensors header and the size it implies, the zip
directory at the end of each ``torch.save`` file, the JSON files parsed (``trainer_state.json`` is written last).
`newest_complete_checkpoint` picks the newest checkpoint with no problem.

`CheckpointSafety`, a base of `roadseg_utils.trainer.FrozenBackboneTrainer`, changes how the `Trainer` writes and
reads checkpoints (transformers 5.24):
- the model, its configuration and image processor are written into a temporary folder beside their place and each
  file is then moved in (``os.replace``), so a kill never leaves a cut-off ``model.safetensors`` where a reader
  would load it;
- a checkpoint or final model that cannot be written (a full disk raises OSError, safetensors' own error or torch's
  RuntimeError, which only says "unexpected pos") raises `SaveError` naming the folder, and a checkpoint folder the
  failed save created is removed, so the newest checkpoint left is a complete one;
- upstream loads a checkpoint's weights by their stored names, but ``save_pretrained`` stores the Swin backbone
  under other names than its modules', so a resumed run silently kept the backbone it started with (harmless while
  frozen, the loss of its training with ``--unfreeze_backbone``); checkpoints are loaded through
  ``from_pretrained``, which maps the names, and copied strictly;
- upstream trains one step before it checks ``max_steps``, so a run resumed from the checkpoint of its last step
  trained one step more than an uninterrupted one; a finished run trains nothing more.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import uuid
import zipfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .cli import CommandLineError, one_line

logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
STATE_FILE = "trainer_state.json"
TORCH_FILES = ("optimizer.pt", "scheduler.pt")
OPTIONAL_TORCH_FILES = ("scaler.pt",)
MAX_HEADER_BYTES = 100 * 2**20
FULL_DISK_BYTES = 2**20
STAGING_PREFIX = ".saving-"


class SaveError(OSError):
    """Writing a checkpoint or the final model failed; the message names the folder and the reason in one line."""

    def __init__(self, folder: str | os.PathLike[str], err: BaseException) -> None:
        reason = "no space left on the device" if _out_of_space(folder, err) else one_line(err)
        super().__init__(f"cannot write {folder}: {reason}")


def _out_of_space(folder: str | os.PathLike[str], err: BaseException) -> bool:
    """Whether a write failed for want of space (torch's writer only says "unexpected pos", so ask the disk)."""
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err):
        return True
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        disk = os.statvfs(path)
    except OSError:
        return False
    return disk.f_bavail * disk.f_frsize < FULL_DISK_BYTES


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (missing, truncated, bad header), or None; reads only its header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER_BYTES, size - 8):
                return f"{path.name} is truncated or not a safetensors file"
            header = json.loads(stream.read(header_size))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{path.name} has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file is unusable, or None: its zip directory (at the end of the file) must read."""
    try:
        with zipfile.ZipFile(path):
            return None
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"{path.name} is truncated or not a torch file"


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path.name} is truncated or not JSON"
    return None


def _weights_problem(folder: Path) -> str | None:
    index = folder / WEIGHTS_INDEX_FILE
    if not index.exists():
        return _safetensors_problem(folder / WEIGHTS_FILE)
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"{WEIGHTS_INDEX_FILE} is truncated or not a weight index"
    return next((problem for shard in shards if (problem := _safetensors_problem(folder / shard))), None)


def _rng_files(folder: Path, world_size: int) -> list[Path]:
    """The RNG files a resume with ``world_size`` processes reads, plus any other present (all must read)."""
    expected = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    present = sorted(path.name for path in folder.glob("rng_state*.pth"))
    # A checkpoint of another process count holds the other naming only: the Trainer then resumes without RNG states.
    same_kind = [name for name in present if (name == "rng_state.pth") == (world_size == 1)]
    names = expected if same_kind or not present else []
    return [folder / name for name in sorted({*names, *present})]


def checkpoint_problem(folder: str | os.PathLike[str], world_size: int = 1, with_optimizer: bool = True) -> str | None:
    """What makes a checkpoint folder unusable for resuming (the first missing or truncated file), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such checkpoint folder"
    problems = [_json_problem(folder / STATE_FILE), _json_problem(folder / "config.json"), _weights_problem(folder)]
    if with_optimizer:
        problems += [_torch_file_problem(folder / name) for name in TORCH_FILES]
        problems += [_torch_file_problem(path) for path in _rng_files(folder, world_size)]
    problems += [_torch_file_problem(folder / name) for name in OPTIONAL_TORCH_FILES if (folder / name).exists()]
    return next((problem for problem in problems if problem), None)


def remove_stale_staging(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary save folders a killed run left in ``output_dir`` and its checkpoints; those deleted.

    Call it only while holding the folder's `roadseg_utils.output_dir.OutputLock`: then no live save owns them.
    """
    folder = Path(output_dir)
    stale = [*folder.glob(f"{STAGING_PREFIX}*"), *folder.glob(f"checkpoint-*/{STAGING_PREFIX}*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def checkpoint_folders(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` folders of an output folder, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if (match := CHECKPOINT_PATTERN.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def newest_complete_checkpoint(
    output_dir: str | os.PathLike[str], world_size: int = 1, with_optimizer: bool = True
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint with no problem (or None), and the newer (path, problem) pairs passed over."""
    skipped = []
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder, world_size, with_optimizer)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


class CheckpointSafety(Trainer):
    """`Trainer` methods that write whole files, name failed saves and resume exactly (module docstring)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Upstream's save into a folder beside the files, each then moved in whole; a failure raises `SaveError`."""
        target = Path(output_dir or self.args.output_dir)
        staging = target / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            super().save_model(str(staging), _internal_call=True)
            if self.args.should_save:
                for path in sorted(staging.iterdir()):
                    os.replace(path, target / path.name)
        except SaveError:
            raise
        except (OSError, RuntimeError, SafetensorError) as err:
            raise SaveError(target, err) from err
        finally:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        existed = folder.exists()
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as err:
            if not existed and self.args.should_save:
                # A partial checkpoint would look newer than the last complete one; it also holds the disk space.
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(err, SaveError):
                raise
            raise SaveError(folder, err) from err

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = model if model is not None else self.model
        if not isinstance(target, PreTrainedModel) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        logger.info(f"Loading model from {resume_from_checkpoint}.")
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(saved.state_dict(), strict=True)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)


def checkpoint_to_resume(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: --resume_from_checkpoint if complete, else the newest complete one in output_dir.

    Newer checkpoints a killed run left partial are logged and passed over. An incomplete --resume_from_checkpoint
    raises `CommandLineError`.
    """
    world_size, with_optimizer = training_args.world_size, not training_args.save_only_model
    named = training_args.resume_from_checkpoint
    if named:
        problem = checkpoint_problem(named, world_size, with_optimizer)
        if problem is not None:
            raise CommandLineError(f"--resume_from_checkpoint {named}: {problem}; name a complete checkpoint")
        return named
    if not training_args.do_train or training_args.overwrite_output_dir:
        return None
    newest, skipped = newest_complete_checkpoint(training_args.output_dir, world_size, with_optimizer)
    for folder, problem in skipped:
        logger.warning(f"not resuming from {folder}: {problem} (a run stopped while writing it)")
    return str(newest) if newest is not None else None
