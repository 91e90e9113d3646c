"""The `DataError` hierarchy: every bad-data error names its file or folder and the problem in one line."""

from __future__ import annotations

import pickle
from typing import Any


class DataError(ValueError):
    """Bad data input; the message names the file or folder and the problem (scripts print it as one line)."""


class BadSampleError(DataError):
    """One sample cannot be used; ``path`` names its file and ``problem`` says why."""

    def __init__(self, path: str, problem: str) -> None:
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
