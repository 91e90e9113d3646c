"""Atomic file writes: every output goes to a temporary file beside its target, then ``os.replace``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a binary stream into a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one. Each call has its own temporary name, so
    threads and processes may write at once; the file is created by ``open``, so it gets the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8, byte for byte (no newline translation), to ``path`` atomically."""
    return write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))
