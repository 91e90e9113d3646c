"""Opening stored images (a file path or encoded bytes) safely, and checking them without decoding their pixels.

The rules, applied the same way at start-up validation, when a row is decoded (`decoding`), and to Hugging Face
datasets (whose ``datasets.Image`` columns apply the EXIF orientation themselves when they decode):
- **Only a regular file is opened.** A directory, FIFO or device named like an image is refused, never read (a FIFO
  would block forever), as are an empty file, a symlink loop and an unreadable file.
- **No decompression bombs:** an image over PIL's ``Image.MAX_IMAGE_PIXELS`` is refused before it is decoded.
- **EXIF orientation is applied:** a file or encoded bytes is read upright, as ``datasets.Image`` decodes it (and as
  image viewers and annotation tools show it), so the size validation reports is the size training sees. Masks
  follow the same rule. An image already decoded (a PIL image, an array) is taken as it is. The Hugging Face source
  hands ``datasets.Image`` columns over undecoded, so they are read by these rules too.
- **Integrity without decoding** (`check_integrity`): a PNG's chunk CRCs are checked to its end (PIL's ``verify``);
  a JPEG must end with its end-of-image marker (zero padding after it is allowed), and only where that marker is
  missing (a trailer after it, or a truncated file) is the JPEG decoded to tell; other formats are decoded.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import reason

Problem = Callable[[str], Exception]  # builds the caller's error from a problem description

ORIENTATION_TAG = 0x0112
_TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_TAIL_BLOCK = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_regular_file(path: str, problem: Problem) -> None:
    """Refuse anything but a non-empty, readable regular file, without opening it (a FIFO would block)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise problem("is a broken symbolic link" if os.path.islink(path) else "file does not exist") from None
    except OSError as err:  # a symlink loop, a too-long name, a denied folder
        raise problem(f"cannot be read ({err.strerror or reason(err)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise problem("is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise problem("is not a regular file (a FIFO, socket or device)")
    if info.st_size == 0:
        raise problem("is an empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise problem("cannot be read (permission denied)")


@contextmanager
def open_stored_image(value: str | os.PathLike[str] | bytes, problem: Problem) -> Iterator[Image.Image]:
    """A stored image opened lazily (header read, pixels not decoded), or ``problem`` raised saying what is wrong."""
    if isinstance(value, (str, os.PathLike)):
        source: Any = os.fspath(value)
        check_regular_file(source, problem)
    else:
        if not value:
            raise problem("is empty (0 bytes)")
        source = io.BytesIO(value)
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS PIL only warns; a bomb is refused either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise problem(f"decompression bomb refused: {reason(err)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError) as err:
        # PIL says "cannot identify" for a damaged header too; the signature tells a damaged image from a non-image.
        known = _format_by_signature(value if isinstance(value, bytes) else _first_bytes(source))
        if known is not None:
            raise problem(f"truncated or corrupt {known} header ({reason(err)})") from None
        raise problem("not an image file (PIL cannot identify its format)") from None
    with image:
        yield image


def _first_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


def _format_by_signature(data: bytes) -> str | None:
    """The image format a file's first bytes announce, to tell a damaged image from a file of another kind."""
    signatures = ((_PNG_SIGNATURE, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
                  (b"MM\x00*", "TIFF"), (b"BM", "BMP"))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in signatures if data.startswith(signature)), None)


def _exif_orientation(exif: Image.Exif) -> int:
    value = exif.get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) else 1


def _png_late_exif(value: str | bytes) -> bytes | None:
    """The eXIf chunk of a PNG that stores it after the image data (PIL reads it only when decoding)."""
    with open(value, "rb") if isinstance(value, str) else io.BytesIO(value) as handle:
        handle.seek(len(_PNG_SIGNATURE))
        while header := handle.read(8):
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                return b"Exif\x00\x00" + handle.read(length)
            if kind == b"IEND":
                return None
            handle.seek(length + 4, os.SEEK_CUR)
    return None


def upright_size(image: Image.Image, value: str | bytes, problem: Problem) -> tuple[int, int]:
    """(height, width) of an opened image once its EXIF orientation is applied, read from headers only."""
    width, height = image.size
    try:
        if image.format == "PNG":
            # PIL's PNG reader decodes the whole image to find an eXIf chunk stored after the pixels; read it here.
            data = image.info.get("exif") or _png_late_exif(value)
            exif = Image.Exif()
            if data:
                exif.load(data)
        else:
            exif = image.getexif()
        orientation = _exif_orientation(exif)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, KeyError, TypeError) as err:
        raise problem(f"unreadable EXIF data ({reason(err)})") from None
    return (width, height) if orientation in _TRANSPOSING else (height, width)


def _jpeg_ends_with_eoi(image: Image.Image) -> bool:
    """Whether the JPEG's last non-zero bytes are its end-of-image marker FF D9 (read from the file's tail)."""
    handle = image.fp
    end = handle.seek(0, os.SEEK_END)
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        handle.seek(start)
        kept = len(handle.read(end - start).rstrip(b"\x00"))
        if kept:
            end = start + kept
            break
        end = start
    if end < 2:
        return False
    handle.seek(end - 2)
    return handle.read(2) == b"\xff\xd9"


def check_integrity(image: Image.Image, problem: Problem) -> None:
    """Refuse a truncated or corrupt image without decoding it where the format allows (see the module docstring).

    ``image`` is used up: a PNG's ``verify`` leaves it unusable.
    """
    try:
        if image.format == "PNG":
            image.verify()
            return
        if image.format in ("JPEG", "MPO") and _jpeg_ends_with_eoi(image):
            return
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as err:
        detail = reason(err)
        if image.format in ("JPEG", "MPO"):
            detail = f"truncated JPEG: no end-of-image marker, and decoding it fails ({detail})"
        elif image.format == "PNG":
            detail = f"truncated or corrupt PNG ({detail})"
        raise problem(detail) from None


def decode_upright(image: Image.Image, problem: Problem) -> Image.Image:
    """An opened image decoded, with its EXIF orientation applied (what ``datasets.Image`` returns)."""
    try:
        image.load()
        # datasets.Image transposes only when the tag is present; exif_transpose is the same otherwise.
        if image.getexif().get(ORIENTATION_TAG) is not None:
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, KeyError, TypeError) as err:
        raise problem(f"decoding fails: {reason(err)}") from None
    return image


# Per file: size, modification time, status-change time, inode.
STAMP_FIELDS = 4


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """What tells a file's content apart between runs without reading it: size, mtime, ctime and inode.

    Size and mtime alone let a replaced file pass for the old one (``cp --preserve=timestamps``, ``os.utime``).
    The status-change time cannot be set from user space and moves on every write, chmod or rename, and a file
    renamed into place has a new inode; so a replacement always changes the stamp, and a rerun hashes nothing.
    Raises `OSError` when the file cannot be stat'ed.
    """
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino
