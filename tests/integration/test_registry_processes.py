"""The registry against other processes: a second process that may not open a registry for writing
while one holds it (but may read), and a registry on a real ``chroma run`` server. (Split from
tests/unit/test_registry.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.registry import (
    DIM,
    brute_force,
    make_adapter,
    make_meta,
    new_registry,
)

from server.registry import (
    NotARegistryError,
    ReadOnlyError,
    Registry,
    RegistryError,
    RegistryLockedError,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_open_errors_and_locking(tmp_path):
    with pytest.raises(NotARegistryError, match="Registry.init"):
        Registry(tmp_path)
    root = tmp_path / "r"
    reg = new_registry(root)
    reg.add(make_adapter(1), np.zeros(DIM), make_meta(0))
    with pytest.raises(RegistryError, match="already holds a registry"):
        new_registry(root)
    # another process may not open it for writing while we hold it
    code = (
        "import sys; from server.registry import Registry, RegistryLockedError\n"
        "try:\n    Registry(sys.argv[1])\nexcept RegistryLockedError as e:\n    print('LOCKED', e); "
        "sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and f"pid {os.getpid()}" in out.stdout, out.stderr
    # ... but may read; a read-only view sees later writes
    ro = Registry(root, read_only=True)
    assert len(ro) == 1
    reg.add(make_adapter(2), np.ones(DIM), make_meta(1))
    assert len(ro) == 2 and ro.query(np.ones(DIM), 1)[0].record.meta.site == "b"
    with pytest.raises(ReadOnlyError):
        ro.add(make_adapter(3), np.ones(DIM), make_meta(2))
    ro.close()
    reg.close()
    assert issubclass(RegistryLockedError, RegistryError)
    with Registry(root):  # released
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration
def test_http_chroma_server(tmp_path):
    chroma_bin = Path(sys.executable).parent / "chroma"
    if not chroma_bin.exists():
        pytest.skip("no chroma CLI in this environment")
    port = _free_port()
    log = open(tmp_path / "chroma.log", "wb")
    proc = subprocess.Popen(
        [str(chroma_bin), "run", "--path", str(tmp_path / "server-data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"chroma run did not start: {(tmp_path / 'chroma.log').read_text()[-2000:]}")
                time.sleep(0.3)
        rng = np.random.default_rng(2)
        Z = rng.standard_normal((150, DIM)).astype(np.float32)
        root = tmp_path / "r"
        with new_registry(root, chroma_host="127.0.0.1", chroma_port=port) as reg:
            recs = reg.add_many([(make_adapter(i % 5), Z[i], make_meta(i)) for i in range(150)])
            ids = [r.id for r in recs]
            assert not (root / "chroma").exists() and reg._index.collection.count() == 150
        with Registry(root) as reg:  # reopens against the server, reconciles
            assert reg.index_ready
            q = Z[4] + 0.01
            order, _ = brute_force(Z, q, 6)
            assert [h.record.id for h in reg.query(q, 6, method="index")] == [ids[o] for o in order]
            reg.remove(ids[order[0]])
            assert reg._index.collection.count() == 149
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
