"""Bounded readers (common/files/safeio.py) and atomic output directories (server/outdir.py)."""

from __future__ import annotations

import binascii
import json
import os
import threading

import numpy as np
import pytest

from common.files.safeio import (
    UnsafeInputError,
    b64decode_strict,
    check_name,
    check_pattern_key,
    load_npy_vector,
    loads_json,
    read_regular_file,
)
from server.outdir import MARKER, OutputDirError, output_dir


def test_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "blob"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(UnsafeInputError, read_regular_file, fifo, 100)))
    t.start()
    t.join(timeout=5)
    assert done, "reading a FIFO blocked"
    assert "FIFO" in str(done[0].value)


def test_oversized_and_missing_files_are_refused(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(UnsafeInputError, match="101 bytes; the limit is 100"):
        read_regular_file(big, 100)
    with pytest.raises(UnsafeInputError, match="does not exist"):
        read_regular_file(tmp_path / "nope", 100)
    with pytest.raises(UnsafeInputError, match="directory"):
        read_regular_file(tmp_path, 100)


def test_deeply_nested_json_is_refused_not_a_recursion_error():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(UnsafeInputError, match="nested deeper"):
        loads_json(deep, "meta")
    assert loads_json('{"a": [1, {"b": "[[[["}]}', "meta") == {"a": [1, {"b": "[[[["}]}


@pytest.mark.parametrize("text", ['{"r": NaN}', '{"r": Infinity}', "{", b"\xff\xfe"])
def test_invalid_json_is_a_typed_error(text):
    with pytest.raises(UnsafeInputError):
        loads_json(text, "adapter_config.json")


def test_npy_header_claiming_2_to_the_40_values_is_refused_before_reading(tmp_path):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    path = tmp_path / "z.npy"
    path.write_bytes(buf.getvalue() + np.zeros(8, dtype=np.float32).tobytes())
    with pytest.raises(UnsafeInputError, match="1099511627776 values"):
        load_npy_vector(path, max_values=1 << 20)


def test_npy_object_dtype_matrix_and_short_body_are_refused(tmp_path):
    obj = tmp_path / "o.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeInputError, match="not numeric"):
        load_npy_vector(obj, 100)
    mat = tmp_path / "m.npy"
    np.save(mat, np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(UnsafeInputError, match="not a vector"):
        load_npy_vector(mat, 100)
    short = tmp_path / "s.npy"
    np.save(short, np.zeros(16, dtype=np.float32))
    short.write_bytes(short.read_bytes()[:-8])
    with pytest.raises(UnsafeInputError, match="data bytes"):
        load_npy_vector(short, 100)
    good = tmp_path / "g.npy"
    np.save(good, np.arange(5, dtype=np.float64))
    assert load_npy_vector(good, 100).tolist() == [0, 1, 2, 3, 4]


def test_catastrophic_backtracking_pattern_keys_are_refused():
    assert check_pattern_key("model.layers.0.self_attn.q_proj", "rank_pattern") == "model.layers.0.self_attn.q_proj"
    for bad in ["(a+)+$", "q_proj|v_proj", ".*", "", "x" * 300, 3]:
        with pytest.raises(UnsafeInputError, match="pattern key"):
            check_pattern_key(bad, "rank_pattern")


@pytest.mark.parametrize("bad", ["a\u202eb", "a\u200bb", "a\x00b", "a\nb", " a", "", "a" * 200, "a\u2028b", 7])
def test_names_with_control_bidi_or_zero_width_characters_are_refused(bad):
    with pytest.raises(UnsafeInputError):
        check_name(bad, "site id")


def test_names_are_nfc_normalised():
    assert check_name("cafe\u0301", "site id") == "caf\u00e9"
    assert check_name("Hôpital Nord 2", "site id") == "Hôpital Nord 2"


# -- atomic output directories --------------------------------------------------------------------


def test_output_dir_refuses_a_foreign_non_empty_directory_and_leaves_it_intact(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious source adapter")
    with pytest.raises(OutputDirError, match="--force"):
        with output_dir(out, "composition"):
            raise AssertionError("must not be reached")
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious source adapter"
    with output_dir(out, "composition", force=True) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new")
    assert (out / "adapter_model.safetensors").read_bytes() == b"new"


def test_output_dir_replaces_an_earlier_output_of_the_same_kind_whole(tmp_path):
    out = tmp_path / "composed"
    with output_dir(out, "composition") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "old_only").write_text("x")
    assert json.loads((out / MARKER).read_text())["kind"] == "composition"
    with output_dir(out, "composition") as tmp:
        (tmp / "adapter_config.json").write_text('{"new": 1}')
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "adapter_config.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".composed")]


def test_output_dir_failure_changes_nothing(tmp_path):
    out = tmp_path / "composed"
    with output_dir(out, "composition") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with output_dir(out, "composition") as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash while writing")
    assert (out / "a").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".composed")]


def test_check_name_remembers_accepted_names_only() -> None:
    """Accepted names are cached (bulk inserts repeat them); a refused one is refused every time,
    and the cache never merges names that normalise differently or checks of another field."""
    for _ in range(3):
        assert check_name("e\u0301cole", "site") == "\u00e9cole"
        assert check_name("\u00e9cole", "site") == "\u00e9cole"
        with pytest.raises(UnsafeInputError, match="U\\+202E"):
            check_name("site\u202e", "site")
        with pytest.raises(UnsafeInputError, match="must be a string"):
            check_name(["site"], "site")
    with pytest.raises(UnsafeInputError, match="limit is 3"):
        check_name("abcd", "task", max_length=3)
    assert check_name("abcd", "task") == "abcd"
    with pytest.raises(UnsafeInputError, match="^task "):
        check_name("a\u200bb", "task")


@pytest.mark.parametrize("text", [b"AAAA AAAA", b"AAAA\nAAAA", b"AA==AA==", b"AAA", b"AA=A", b"****"])
def test_strict_base64_refuses_what_a_lenient_decoder_would_accept(text: bytes) -> None:
    """Old registries' z travel as base64: anything but the exact standard form is refused, on
    every supported Python (3.10 has no ``strict_mode``)."""
    with pytest.raises(binascii.Error):
        b64decode_strict(text)


def test_strict_base64_decodes_the_standard_form() -> None:
    assert b64decode_strict(b"AAECAw==") == bytes([0, 1, 2, 3])
