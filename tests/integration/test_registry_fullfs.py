"""A full disk never corrupts the registry (issue 10 item 4), tried on a real tiny tmpfs.

The child (``tests/support/tmpfs.run_in_tmpfs``: a private mount namespace, root only) fills the
tmpfs so that only k bytes stay free, tries an ``add`` (or ``add_base``, which rewrites
registry.json), and checks: either the add succeeded, is audited and survives a reopen, or it
raised a typed ``RegistryStorageError`` naming the write point and after reopening the registry is
exactly as before; ``verify()``, the audit chain and the records binding are clean after every
trial, and a later add in the *same* open registry (the case that used to chain a good line onto
a torn one) succeeds and survives. k sweeps every page count around the writes, so each write
point (adapter blob, z column, record line, audit entry, registry.json) runs out of space at least
once. The z rows of an add that failed after the column write stay behind as orphan rows that no
record names (allowed: only records.jsonl and registry.json must be byte-identical).
"""

from __future__ import annotations

import pytest
from support.tmpfs import run_in_tmpfs

pytestmark = pytest.mark.integration

CHILD = r'''
import errno, json, os, sys
from pathlib import Path
import numpy as np
import torch
from common.adapters import LoraAdapter, LoraModule
from server import audit as audit_mod
from server.registry import AdapterMeta, Registry
from server.registry.binding import check_binding
from server.registry.errors import RegistryError, RegistryStorageError

mnt = Path(sys.argv[1]); chroma = sys.argv[2]
root = mnt / "reg"
BASE = "sha256:" + "5e" * 32
SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (20, 12)}
DIM = 1024  # one z row = one 4 KiB page: an add whose blob exists runs out of space at the z column
Registry.init(root, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM).close()
open_reg = lambda: Registry(root, chroma=chroma)

def item(i, blob_seed=None):
    """Record i; with ``blob_seed`` its adapter is that of an earlier record (its blob already exists,
    so the first write of the add is the z column)."""
    g = torch.Generator().manual_seed(i if blob_seed is None else blob_seed)
    ad = LoraAdapter({n: LoraModule(torch.randn(2, a, generator=g) * 0.1, torch.randn(o, 2, generator=g) * 0.1, 2.0)
                      for n, (o, a) in SHAPES.items()})
    z = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return ad, z, AdapterMeta(site=f"site{i % 3}", task="t", modality="text", base_fingerprint=BASE, sample_count=5)

filler = mnt / "filler"
def fill(k):
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    block, size = b"\0" * 4096, 0
    try:
        while True:
            size += os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.ftruncate(fd, max(0, size - k))
    os.close(fd)
def unfill():
    filler.unlink(missing_ok=True)

def state():
    return ((root / "records.jsonl").read_bytes(), (root / "registry.json").read_bytes())

def clean(reg):
    probs = reg.verify(full=True) + [str(p) for p in audit_mod.verify(root / "audit.jsonl")]
    probs += check_binding(root / "records.jsonl", root / "audit.jsonl")
    assert probs == [], probs

stages, ok, trials = {}, 0, 0
n = 0
reg = open_reg()
for rnd in range(3):
    for k in range(0, 6 * 4096, 2048):
        trials += 1
        ids0, (rec0, cfg0) = reg.ids(), state()
        fill(k)
        base_try = (trials % 5 == 0)
        try:
            if base_try:
                reg.add_base("sha256:" + f"{trials:02x}" * 32, SHAPES, name=f"b{trials}")
            else:
                rec = reg.add(*item(n, 0 if (trials % 3 == 1 and n > 0) else None)); n += 1
            success = True
        except RegistryStorageError as exc:
            success = False
            stages[exc.stage] = stages.get(exc.stage, 0) + 1
        except RegistryError as exc:
            raise AssertionError(f"untyped storage failure: {type(exc).__name__}: {exc}")
        unfill()
        if success:
            ok += 1
            if not base_try:
                acc = [e for _, e in audit_mod.read_entries(root / "audit.jsonl")
                       if e["event"] == "submission.accepted"]
                assert acc[-1]["record_id"] == rec.id, "the add returned without its audit entry"
                want = ids0 + [rec.id]
            else:
                want = ids0
        else:
            assert reg.ids() == ids0, "a failed add changed the open registry"
            assert state() == (rec0, cfg0), "a failed add left bytes in records.jsonl / registry.json"
            want = ids0
            # the same open registry keeps working: the next add chains onto good lines only
            rec = reg.add(*item(n)); n += 1
            want = want + [rec.id]
        reg.close()
        reg = open_reg()
        assert reg.ids() == want, (reg.ids(), want)
        clean(reg)
reg.close()
print(json.dumps({"stages": stages, "ok": ok, "trials": trials}))
'''


@pytest.mark.parametrize("chroma", ["off", "embedded"])
def test_full_disk_at_every_write_point(chroma):
    size = 640 if chroma == "off" else 16384
    out = run_in_tmpfs(CHILD, size_kib=size, args=[chroma], timeout=900)
    assert out["ok"] > 0
    for stage in ("adapter blob", "z column", "record line", "audit entry", "registry.json"):
        assert out["stages"].get(stage, 0) > 0, f"no trial ran out of space at the {stage}: {out}"
