"""What the scripts share on the command line: one-line error text and ``HxW`` size arguments."""

from __future__ import annotations

import re


def one_line(err: BaseException, token: str | None = None) -> str:
    """The first line of an error's message (its type name when empty), with ``token`` masked, for one-line errors."""
    message = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return message.replace(token, "<token>") if token else message


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (or ``"N"`` for a square) into ``(height, width)`` positive integers."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected HEIGHTxWIDTH with positive integers, e.g. 360x640")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) is not None else height
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid size {text!r}: height and width must be positive, e.g. 360x640")
    return height, width
