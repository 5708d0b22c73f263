"""server/zindex: the z column file (crash safety, damage detection, reopen) and top-k request checks.

The exact top-k equivalences against brute force (thousands of rows per case, ~1 min of CPU) are
in ``tests/integration/test_zindex_exact.py``, out of the fast loop."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from server.zindex import ColumnCorruptError, ColumnDimensionError, ExactTopK, TopKError, ZColumn
from server.zindex.column import HEADER_BYTES

# ---- exact top-k ---------------------------------------------------------------------------------


def test_search_rejects_bad_requests_with_the_reason() -> None:
    Z = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    ix = ExactTopK(4)
    ix.add(Z)
    with pytest.raises(TopKError, match="only 2 row"):
        ix.search(Z[0], 3, Z, mask=np.arange(10) < 2)
    with pytest.raises(TopKError, match="5 values"):
        ix.search(np.zeros(5), 1, Z)


# ---- column file ---------------------------------------------------------------------------------


def test_column_reopen_keeps_rows_and_dimension(tmp_path) -> None:
    Z = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    col = ZColumn.create(tmp_path / "z.f32", 16)
    assert list(col.append(Z[:20])) == list(range(20))
    col.append(Z[20:])
    col.close()
    with ZColumn(tmp_path / "z.f32", dim=16) as col:
        assert len(col) == 50 and np.array_equal(col.matrix(), Z)
        assert np.array_equal(col.rows([3, 40]), Z[[3, 40]])
        assert col.verify() == []
        import hashlib

        assert col.row_sha256(7) == hashlib.sha256(Z[7].astype("<f4").tobytes()).hexdigest()
        old = col.matrix()
        col.append(Z[:1])  # a view taken before an append stays readable
        assert np.array_equal(old, Z) and len(col.matrix()) == 51
    with pytest.raises(ColumnDimensionError, match="16-d"):
        ZColumn(tmp_path / "z.f32", dim=32)


def test_column_torn_tail_past_the_published_count_is_truncated(tmp_path) -> None:
    path = tmp_path / "z.f32"
    Z = np.ones((10, 8), np.float32)
    with ZColumn.create(path, 8) as col:
        col.append(Z)
    # a crash after writing rows but before publishing the count: rows past the count
    with open(path, "ab") as fh:
        fh.write(np.full((3, 8), 2, np.float32).tobytes() + b"\x01\x02")
    with open(str(path) + ".crc", "ab") as fh:
        fh.write(b"\x00" * 12)
    with ZColumn(path) as col:
        assert len(col) == 10 and col.recovered_rows == 4
        col.append(np.full((1, 8), 5, np.float32))
    assert os.path.getsize(path) == HEADER_BYTES + 11 * 32
    with ZColumn(path) as col:
        assert len(col) == 11 and col.matrix()[10, 0] == 5 and col.verify() == []


def test_column_torn_header_slot_falls_back_to_the_other_slot(tmp_path) -> None:
    path = tmp_path / "z.f32"
    with ZColumn.create(path, 4) as col:
        col.append(np.ones((2, 4), np.float32))
        col.append(np.ones((3, 4), np.float32))
        slot = col._slot
    with open(path, "rb+") as fh:  # the newest slot torn mid-write: the previous count survives
        fh.seek(slot * 512 + 10)
        fh.write(b"\xff\xff")
    with ZColumn(path) as col:
        assert len(col) == 2 and col.recovered_rows == 3


def test_column_flipped_bit_is_detected_and_the_row_named(tmp_path) -> None:
    path = tmp_path / "z.f32"
    Z = np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32)
    with ZColumn.create(path, 8) as col:
        col.append(Z)
    with open(path, "rb+") as fh:  # row 17, far from the tail (not caught by the open-time check)
        fh.seek(HEADER_BYTES + 17 * 32 + 5)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))
    with ZColumn(path) as col:
        assert col.verify(raise_on_error=False) == [17]
        with pytest.raises(ColumnCorruptError, match="rows 17") as ei:
            col.verify()
        assert ei.value.bad_rows == [17]
        with pytest.raises(ColumnCorruptError):
            col.rows([16, 17])
        assert np.array_equal(col.rows([16]), Z[[16]])


def test_column_damage_in_the_tail_or_lost_rows_fails_the_open(tmp_path) -> None:
    path = tmp_path / "z.f32"
    with ZColumn.create(path, 8) as col:
        col.append(np.ones((5, 8), np.float32))
    with open(path, "rb+") as fh:
        fh.seek(HEADER_BYTES + 4 * 32)
        fh.write(struct.pack("<f", 3.0))
    with pytest.raises(ColumnCorruptError, match="crc32"):
        ZColumn(path)
    with open(path, "rb+") as fh:
        fh.truncate(HEADER_BYTES + 2 * 32)
    with pytest.raises(ColumnCorruptError, match="publishes 5 rows"):
        ZColumn(path)
