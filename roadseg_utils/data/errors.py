"""The `DataError` hierarchy: every bad-data error names its file or folder and the problem in one line.

An error raised inside a PyTorch ``DataLoader`` worker comes back to the main process rebuilt as
``type(message)`` with ``message`` holding the worker's whole traceback (``torch/_utils.py``,
``ExceptionWrapper.reraise``). Every class here rebuilds itself from such a message with its original text, and a
`BadSampleError` with its original ``path`` and ``problem``, so the main process sees the same error as the worker.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def _worker_message(cls: type, message: str) -> str:
    """The original message of a ``cls`` error inside a DataLoader worker's traceback text, else ``message``."""
    if _WORKER_TRACEBACK not in message:
        return message
    # The traceback ends with "<module>.<Class>: <message>"; a chained cause comes before it, so the last one wins.
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind("\n" + marker)
    if start < 0:
        return message
    return message[start + 1 + len(marker):].strip()


def reason(err: BaseException) -> str:
    """An underlying error's message on one line (PIL and JSON messages may span several), for a ``problem``."""
    return " ".join(str(err).split()) or type(err).__name__


def _split_path(text: str) -> tuple[str, str]:
    """``path: problem`` split after the longest prefix that exists on disk, else at the first ``": "``."""
    cuts = [m.start() for m in re.finditer(": ", text)]
    if not cuts:
        return text, ""
    existing = [cut for cut in cuts if os.path.lexists(text[:cut])]
    cut = existing[-1] if existing else cuts[0]
    return text[:cut], text[cut + 2:]


class DataError(ValueError):
    """Bad data input; the message names the file or folder and the problem (scripts print it as one line)."""

    def __init__(self, message: str = "", *args: Any) -> None:
        super().__init__(_worker_message(type(self), message) if isinstance(message, str) else message, *args)


class BadSampleError(DataError):
    """One sample cannot be used; ``path`` names its file and ``problem`` says why."""

    def __init__(self, path: str, problem: str | None = None) -> None:
        if problem is None:
            # One argument: a DataLoader worker's traceback text (or "path: problem") to rebuild from.
            path, problem = _split_path(_worker_message(type(self), path))
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.problem)


class MissingMaskError(BadSampleError):
    """The image has no mask file."""


class UnreadableImageError(BadSampleError):
    """The image file is corrupt, truncated or not an image."""


class UnreadableMaskError(BadSampleError):
    """The mask exists but cannot be decoded into a 2-D map of label ids."""


class SizeMismatchError(BadSampleError):
    """Image and mask differ in size."""


class LabelValueError(BadSampleError):
    """The mask holds values outside the label set (other than 255 = ignore)."""


class EmptyDatasetError(DataError):
    """No usable sample was found (none present, or all skipped as bad)."""


class HubDatasetUnavailableError(DataError):
    """A Hub dataset could not be fetched (offline, wrong name, no access)."""


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy / PIL / plain-container allowlist."""
