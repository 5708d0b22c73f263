"""Bounded readers for files and values that come from outside: every failure is a typed error, in bounded time.

A hostile or broken input must never reach a traceback, hang or exhaust memory: a FIFO where a file
was expected blocks a plain ``open`` forever; ``json.loads`` of 100,000 nested brackets raises
``RecursionError``; a ``.npy`` header may claim 2^40 values; a PEFT ``rank_pattern`` key is a regular
expression that may backtrack catastrophically. The functions here check each of these before doing
the work, and raise ``UnsafeInputError`` (a ``ValueError``) naming the input, what was wrong and what
was expected.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import os
import re
import stat
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 16 << 20
MAX_NAME_LENGTH = 128


class UnsafeInputError(ValueError):
    """An input file or value is malformed, oversized or of the wrong kind; nothing was read from it."""


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; a FIFO, device, directory or larger file is refused.

    The file is opened with ``O_NONBLOCK`` so that a FIFO put in its place cannot block the open, and
    its type and size are checked on the open descriptor (no race with a rename in between).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise UnsafeInputError(f"{what} {p} does not exist") from None
    except IsADirectoryError:
        raise UnsafeInputError(f"{what} {p} is a directory; expected a regular file") from None
    except OSError as exc:
        raise UnsafeInputError(f"{what} {p} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else "special file"
            raise UnsafeInputError(f"{what} {p} is a {kind}; expected a regular file")
        if st.st_size > max_bytes:
            raise UnsafeInputError(f"{what} {p} has {st.st_size} bytes; the limit is {max_bytes}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew while we read
                raise UnsafeInputError(f"{what} {p} grew past the limit of {max_bytes} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _depth_ok(text: str, max_depth: int) -> int:
    """The nesting depth of JSON text (brackets outside strings), computed without recursion."""
    depth = worst = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > worst:
                worst = depth
                if worst > max_depth:
                    return worst
        elif ch in "]}":
            depth -= 1
    return worst


def loads_json(data: str | bytes, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a size and nesting bound, strict UTF-8, and no NaN / Infinity literals."""
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise UnsafeInputError(f"{what}: {len(data)} bytes of JSON; the limit is {max_bytes}")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeInputError(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(data) > max_bytes:
        raise UnsafeInputError(f"{what}: {len(data)} characters of JSON; the limit is {max_bytes}")
    depth = _depth_ok(data, max_depth)
    if depth > max_depth:
        raise UnsafeInputError(f"{what}: JSON nested deeper than {max_depth} levels")

    def no_constant(name: str) -> Any:
        raise UnsafeInputError(f"{what}: JSON holds {name}, which is not valid JSON")

    try:
        return json.loads(data, parse_constant=no_constant)
    except UnsafeInputError:
        raise
    except (ValueError, RecursionError) as exc:
        raise UnsafeInputError(f"{what}: not valid JSON ({exc})") from None


def load_npy_vector(path: str | os.PathLike[str], max_values: int, what: str = "embedding file") -> np.ndarray:
    """A 1-D float vector from a ``.npy`` file, checking the header's shape and dtype before reading the data.

    Refused: a header claiming more than ``max_values`` values, a non-numeric or object dtype (which
    would need pickle), a shape that is not a vector, a data length that does not match the header.
    """
    raw = read_regular_file(path, max_bytes=max_values * 16 + 4096, what=what)
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=4096)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=4096)
        else:
            raise UnsafeInputError(f"{what} {path}: unsupported .npy version {version}")
    except UnsafeInputError:
        raise
    except (ValueError, SyntaxError, OSError) as exc:
        raise UnsafeInputError(f"{what} {path}: not a valid .npy file ({exc})") from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise UnsafeInputError(f"{what} {path}: dtype {dtype} is not numeric; expected float32 values")
    n = int(np.prod(shape, dtype=np.float64)) if shape else 1
    if n > max_values:
        raise UnsafeInputError(f"{what} {path}: the header claims {n} values; the limit is {max_values}")
    squeezed = [s for s in shape if s != 1]
    if len(squeezed) > 1:
        raise UnsafeInputError(f"{what} {path}: shape {tuple(shape)} is not a vector")
    body = raw[buf.tell() :]
    if len(body) != n * dtype.itemsize:
        raise UnsafeInputError(
            f"{what} {path}: the header says {n} values of {dtype} "
            f"({n * dtype.itemsize} bytes), the file holds {len(body)} data bytes"
        )
    arr = np.frombuffer(body, dtype=dtype, count=n)
    if fortran:
        arr = arr.copy()
    return arr.astype(np.float32).reshape(-1)


#: module-name characters; '.' and '-' may be escaped (``re.escape`` of a module name, as
#: ``common.adapters.peft_io`` writes keys it must anchor): literals and '.' match in linear time
_PATTERN_KEY = re.compile(r"(?:[A-Za-z0-9_]|\\?[.\-])+")


def check_pattern_key(key: Any, what: str) -> str:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` key: a module name (suffix), never a general regex.

    PEFT matches these keys as regular expressions, so a key like ``(a+)+$`` can take exponential
    time on a long module name. Real adapters only ever use module names here; we accept exactly
    those characters (``.`` is then harmless: a regex of literals and dots matches in linear time).
    """
    if not isinstance(key, str) or not key or len(key) > 256 or not _PATTERN_KEY.fullmatch(key):
        raise UnsafeInputError(
            f"{what}: pattern key {key!r} is not a module name (letters, digits, '_', '.', '-'); "
            "regular expressions are refused"
        )
    return key


_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # control, format (bidi, zero-width), ...


def check_name(value: Any, what: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A site / task / record name: NFC-normalised, printable, no control, bidi or zero-width characters.

    Returns the normalised name. Two names that look the same ("e" + combining acute vs "é") are the
    same name after normalisation, and a name cannot hide text direction overrides (U+202E) or
    invisible characters (U+200B) that would make an audit report read differently from what it holds.
    Accepted names are remembered (a bulk insert repeats a few site and task names thousands of
    times); a refused one is checked, and refused, every time.
    """
    if not isinstance(value, str):
        raise UnsafeInputError(f"{what} must be a string; got {type(value).__name__}")
    return _checked_name(value, what, max_length)


@functools.lru_cache(maxsize=4096)
def _checked_name(value: str, what: str, max_length: int) -> str:
    name = unicodedata.normalize("NFC", value)
    if not name.strip():
        raise UnsafeInputError(f"{what} must not be empty")
    if len(name) > max_length:
        raise UnsafeInputError(f"{what} has {len(name)} characters; the limit is {max_length}")
    if name != name.strip():
        raise UnsafeInputError(f"{what} {name!r} has leading or trailing whitespace")
    for ch in name:
        cat = unicodedata.category(ch)
        if cat in _FORBIDDEN_CATEGORIES or (cat.startswith("Z") and ch != " "):
            raise UnsafeInputError(
                f"{what} {name!r} holds the invisible or control character U+{ord(ch):04X} "
                f"({unicodedata.name(ch, 'unnamed')}); use printable characters only"
            )
    return name


def b64decode_strict(data: bytes) -> bytes:
    """Standard base64 with nothing tolerated (characters outside the alphabet, bad or misplaced
    padding, data after it): ``binascii.Error`` otherwise. Python 3.11's ``strict_mode``; on 3.10,
    ``b64decode(validate=True)``, which refuses the same inputs through its alphabet-and-padding check."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(data, strict_mode=True)
    return base64.b64decode(data, validate=True)
