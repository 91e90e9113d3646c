"""What the scripts share on the command line: arguments from flags or one JSON file, one-line errors, sizes."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser


class CommandLineError(ValueError):
    """Arguments that cannot work; the message names the option or the argument file, for one error line."""


class OneLineParser(HfArgumentParser):
    """`HfArgumentParser` whose errors become `CommandLineError` (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        """Raise the error instead of printing the usage and exiting."""
        raise CommandLineError(message)


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


def fail(script: str, message: str) -> NoReturn:
    """Print ``<script>: error: <message>`` on stderr and exit with status 1."""
    print(f"{script}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def read_argument_file(path: str) -> dict[str, Any]:
    """The JSON object of an argument file (keys are option names without dashes), or `CommandLineError` naming it."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandLineError(f"{path}: argument file not found") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as err:
        raise CommandLineError(f"{path}: not a readable JSON argument file ({one_line(err)})") from err
    if not isinstance(payload, dict):
        raise CommandLineError(f"{path}: expected a JSON object of option names and values, got "
                               f"{type(payload).__name__}")
    return payload


def parse_script_arguments(
    parser: HfArgumentParser, argv: Sequence[str], check_file: Callable[[str, dict[str, Any]], None] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """The parser's dataclasses from the command line or from one ``.json`` file, and that file's object (or None).

    A value a dataclass refuses, or an unknown or mistyped key of the file, is a `CommandLineError`; the file is
    named in its message. ``check_file(path, payload)`` may refuse a file's object first (naming the file).
    """
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        payload = read_argument_file(argv[0])
        if check_file is not None:
            check_file(argv[0], payload)
        try:
            return tuple(parser.parse_dict(payload)), payload
        except (ValueError, TypeError) as err:
            raise CommandLineError(f"{argv[0]}: {one_line(err)}") from err
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv)), None
    except CommandLineError:
        raise
    except (ValueError, TypeError, OSError) as err:
        raise CommandLineError(one_line(err)) from err
