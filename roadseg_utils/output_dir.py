"""Output folders a reader can trust: checked before any work, locked by one run, marked while incomplete, owned.

Every script calls `prepare_output_dir` before its expensive work, so a folder that is a file, cannot be created or
is read-only stops the run at once instead of after training. `OutputLock` keeps two runs from writing into one
folder at the same time (an advisory ``flock`` released by the kernel when the process dies, so a killed run never
leaves a stale lock). `IncompleteMarker` names the folder's state while files in it are being replaced: a reader
that finds ``RUN_INCOMPLETE`` knows that the files beside it may mix two runs. `claim_output_dir` records which
data, labels and model a folder's files come from, so a rerun with other inputs cannot silently resume or mix.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .atomic import write_text_atomically

# Names starting with "_" stay out of Trainer.push_to_hub uploads (the run record holds local paths).
LOCK_FILE = "_roadseg.lock"
INCOMPLETE_FILE = "RUN_INCOMPLETE"
RUN_FILE = "_roadseg_run.json"


class OutputDirError(RuntimeError):
    """An output folder that cannot be used; the message names the folder and the problem in one line."""


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def prepare_output_dir(path: str | os.PathLike[str], option: str = "--output_dir") -> Path:
    """Create the folder if needed and prove it writable now; raise `OutputDirError` naming the problem."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{option} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"{option} {folder}: cannot create it ({_reason(err)})") from err
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".roadseg-probe-") as probe:
            probe.write(b"roadseg")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise OutputDirError(f"{option} {folder}: cannot write into it ({_reason(err)})") from err
    return folder


class OutputLock:
    """Exclusive, non-blocking lock on an output folder for the lifetime of one run (``with OutputLock(dir): ...``)."""

    def __init__(self, folder: str | os.PathLike[str], script: str) -> None:
        self.folder = Path(folder)
        self.script = script
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputDirError(
                f"{self.folder}: {holder} is writing into this folder; wait for it to finish or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.script} (pid {os.getpid()})".encode())
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._fd is not None:
            # The file stays: unlinking it would let a third run lock a new inode while a second holds the old one.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class IncompleteMarker:
    """``RUN_INCOMPLETE`` in a folder while a run replaces its files; removed only when the run completes."""

    def __init__(self, folder: str | os.PathLike[str], script: str) -> None:
        self.path = Path(folder) / INCOMPLETE_FILE
        self.script = script

    def __enter__(self) -> IncompleteMarker:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        write_text_atomically(
            self.path,
            f"{self.script} (pid {os.getpid()}) started writing here at {started} and has not finished: the files "
            "beside this one may be incomplete or mix two runs. Rerun the same command to complete them.\n",
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.path.unlink(missing_ok=True)


def earlier_outputs(folder: str | os.PathLike[str]) -> list[str]:
    """The sorted names in ``folder`` other than the lock file: what earlier runs or the user left there."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.name != LOCK_FILE)


def is_incomplete(folder: str | os.PathLike[str]) -> bool:
    """Whether a run that was writing into ``folder`` stopped before it completed."""
    return (Path(folder) / INCOMPLETE_FILE).exists()


def claim_output_dir(
    folder: str | os.PathLike[str], script: str, identity: Mapping[str, Any], overwrite: bool = False
) -> None:
    """Record the inputs a folder's outputs come from; refuse a folder holding another run's unless ``overwrite``.

    ``identity`` maps what must match to resume or replace in place (data source and fingerprint, label set, model)
    to JSON-able values. A folder of another script, or of the same script with other inputs, raises
    `OutputDirError` naming the first difference.
    """
    path = Path(folder) / RUN_FILE
    record = {"script": script, **identity}
    if path.is_file() and not overwrite:
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            existing = None
        if not isinstance(existing, dict):
            raise OutputDirError(
                f"{path}: unreadable run record, so the folder's outputs cannot be matched to this run; "
                "use another folder, or --overwrite_output_dir to replace them"
            )
        for key, value in record.items():
            if key in existing and existing[key] != value:
                raise OutputDirError(
                    f"{folder} holds the outputs of a run with {key} {existing[key]!r}, not {value!r}; use another "
                    "folder, or --overwrite_output_dir to replace them"
                )
    write_text_atomically(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
