"""The one durable-file toolkit (``common/files/durable.py``), the one safetensors header parser
(``common/adapters/safetensors_header.py``) and the one egress reader (``common/protocol/egress.py``)."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
from support.registry import make_adapter

from common.adapters import adapter_to_bytes
from common.adapters.safetensors_header import SafetensorsHeaderError, check_sizes, parse_header
from common.files.durable import JsonlLog, TornTailError, atomic_write
from common.protocol.egress import read_egress


def _st(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_atomic_write_replaces_whole_file_private_by_default(tmp_path):
    p = tmp_path / "sub" / "cache.json"
    atomic_write(p, b"old")
    atomic_write(p, "new")
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    atomic_write(p, b"x", mode=0o644)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert sorted(os.listdir(p.parent)) == ["cache.json"], "a temp file was left behind"


def test_jsonl_append_is_whole_lines_and_a_failed_append_is_truncated_back(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    assert log.append(['{"a":1}']) == (0, 8)

    def crash() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        log.append(['{"b":2}', '{"c":3}'], midway=crash)
    assert log.path.read_bytes() == b'{"a":1}\n', "a failed append left a torn line"
    with log.locked(shared=True) as fh:
        assert log.last_line(fh) == b'{"a":1}'


def test_jsonl_torn_tail_is_detected_and_repaired(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.append(['{"a":1}', '{"b":2}'])
    with open(log.path, "ab") as fh:
        fh.write(b'{"c":')  # crash mid-append
    with log.locked() as fh, pytest.raises(TornTailError):
        log.last_line(fh)
    assert log.repair(16) == 5
    assert log.path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert log.read_from(8) == b'{"b":2}\n'


def test_header_parser_accepts_canonical_adapter_bytes():
    blob = adapter_to_bytes(make_adapter(1))
    header = parse_header(blob)
    check_sizes(header)
    assert "__metadata__" in header and any(k.endswith("lora_A.weight") for k in header)


@pytest.mark.parametrize(
    "data, kind, match",
    [
        (b"\x01\x02", "short", "too short"),
        (struct.pack("<Q", 2**62) + b"{}", "length", "oversized"),
        (struct.pack("<Q", 4) + b"nope", "json", "unreadable"),
        (struct.pack("<Q", 2) + b"[]", "object", "not a JSON object"),
        (_st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8), "layout", "out of range"),
        (
            _st(
                {
                    "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "layout",
            "overlap",
        ),
        (_st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12), "layout", "trailing"),
        (_st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, -1]}}, b""), "layout", "out of range"),
        (_st({"t": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8), "layout", "shape"),
    ],
)
def test_header_parser_rejects_hostile_headers_with_a_typed_error(data, kind, match):
    with pytest.raises(SafetensorsHeaderError, match=match) as info:
        parse_header(data)
    assert info.value.kind == kind


def test_header_sizes_must_match_dtype_and_shape():
    header = parse_header(_st({"t": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(SafetensorsHeaderError, match="do not hold F64"):
        check_sizes(header)


def test_read_egress_reports_bad_lines_skips_blank_ones_and_names_a_missing_file(tmp_path):
    p = tmp_path / "egress.jsonl"
    p.write_text('{"records": [], "v": 1}\n\n{"v": 1}\n{"records": [')
    entries, bad = read_egress(p)
    assert [n for n, _ in entries] == [1] and bad == [3, 4]
    with pytest.raises(FileNotFoundError, match="<site-dir>/egress.jsonl"):
        read_egress(tmp_path / "missing.jsonl")
