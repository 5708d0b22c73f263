"""The one safetensors header parser: read and check the JSON header without loading a tensor.

Why hardened: the coordinator reads headers of bytes sent by sites it does not fully trust. A
header length of 2⁶³, a header that is not JSON, offsets that overlap, leave gaps or run past
the end of the buffer must be refused with a typed error *before* anything allocates or slices
by those numbers. Format (https://github.com/huggingface/safetensors): 8 bytes little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the tensor data; offsets are relative to the data start.
"""

from __future__ import annotations

import json
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024
#: bytes per element of the dtypes safetensors defines
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class SafetensorsHeaderError(ValueError):
    """The bytes are not a well-formed safetensors file (the message says which part is wrong).

    ``kind`` classifies it for callers that word their own message: ``short`` (under 8 bytes),
    ``length`` (header length oversized or past the end), ``json`` (not UTF-8 JSON), ``object``
    (JSON but not an object), ``layout`` (entries, offsets or sizes wrong)."""

    def __init__(self, message: str, kind: str = "layout") -> None:
        super().__init__(message)
        self.kind = kind


def parse_header(data: bytes, size: int | None = None) -> dict[str, Any]:
    """The header of the safetensors bytes ``data``, checked against the buffer (or, with
    ``size``, against a file of ``size`` bytes of which ``data`` holds at least the header).

    Raises ``SafetensorsHeaderError`` for: fewer than 8 bytes; a header length over
    ``MAX_HEADER_BYTES`` or past the end; non-UTF-8 / non-JSON / non-object header; an entry
    without a string dtype, an integer shape or two integer data_offsets; offsets that are out of
    range, overlap, or leave bytes no tensor covers. Whether each tensor's bytes match its dtype
    × shape is ``check_sizes`` (separate, so a caller can refuse a dtype by name first).
    """
    if len(data) < 8:
        raise SafetensorsHeaderError(f"{len(data)} bytes is too short for safetensors (8-byte header length)", "short")
    total = len(data) if size is None else size
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > MAX_HEADER_BYTES or n > total - 8:
        raise SafetensorsHeaderError(
            f"header length {n} is oversized or runs past the end of the {total}-byte buffer (truncated?)", "length"
        )
    if n > len(data) - 8:
        raise ValueError(f"parse_header got {len(data)} bytes but the header needs {8 + n}; pass them all")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsHeaderError(f"unreadable header ({exc})", "json") from exc
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("header is not a JSON object", "object")
    body = total - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise SafetensorsHeaderError("__metadata__ must be a JSON object of strings")
            continue
        # JSON gives only exact types, so ``type(x) is int`` is the cheap form of "an int, not a bool"
        if type(info) is not dict:
            raise SafetensorsHeaderError(f"tensor {name!r}: entry is not a JSON object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if type(dtype) is not str:
            raise SafetensorsHeaderError(f"tensor {name!r}: dtype missing or not a string")
        if type(shape) is not list or any(type(s) is not int or s < 0 for s in shape):
            raise SafetensorsHeaderError(f"tensor {name!r}: shape must be a list of non-negative integers")
        if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int:
            raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offs
        if not 0 <= begin <= end <= body:
            raise SafetensorsHeaderError(
                f"tensor {name!r}: data_offsets {offs} are out of range of the {body}-byte data section"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets overlap the previous tensor")
        if begin > pos:
            raise SafetensorsHeaderError(f"tensor {name!r}: {begin - pos} byte gap before its data")
        pos = end
    if pos != body:
        raise SafetensorsHeaderError(f"{body - pos} trailing byte(s) after the last tensor")
    return header


def check_sizes(header: dict[str, Any]) -> None:
    """Every tensor's byte span holds exactly dtype × shape (``SafetensorsHeaderError`` if not)."""
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in DTYPE_SIZES:
            continue
        count = 1
        for s in info["shape"]:
            count *= s
        begin, end = info["data_offsets"]
        if end - begin != count * DTYPE_SIZES[info["dtype"]]:
            raise SafetensorsHeaderError(
                f"tensor {name!r}: {end - begin} bytes do not hold {info['dtype']} of shape {info['shape']}"
            )
