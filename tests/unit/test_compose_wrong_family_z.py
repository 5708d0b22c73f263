"""``rpe compose`` with a z of another family or model: a clear refusal, nothing written.

A coordinator operator composing by hand (docs/COMPOSING.md) who hands the segmentation registry a
report z got ``rpe: error: EmbeddingDimensionError: the target 'cli' sent 576 values, the registry
holds 256 ...`` ('cli' being the default --target). Now the error names the --embedding file, both
sizes, the registry's representation and the command that makes the right z; exit 2, no adapter, no
audit entry. Both directions, on the real two-family registry root.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.cli import rpe_run
from support.two_family import FAMILIES, SEG_DIR, build


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wrong-z")
    return build(tmp)["root"], tmp


@pytest.mark.parametrize("key", list(FAMILIES))
def test_a_z_of_the_other_family_is_refused_before_any_work(capsys, root, key):
    top, tmp = root
    reg = top / SEG_DIR if key == "seg" else top
    other = "report" if key == "seg" else "seg"
    z = tmp / f"{other}-z.npy"
    np.save(z, np.ones(FAMILIES[other]["dim"], dtype=np.float32))
    before = (reg / "audit.jsonl").read_bytes()
    out = tmp / f"out-{key}"
    code, stdout, err = rpe_run(
        capsys, "compose", "--registry", str(reg), "--embedding", str(z), "--k", "2", "--out", str(out)
    )
    assert code == 2 and stdout == "" and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"rpe: error: --embedding {z}: a z of {FAMILIES[other]['dim']} values, but {reg} holds z of "
    ), line
    assert f"{FAMILIES[key]['dim']} ('{FAMILIES[key]['representation']}')" in line and "rpe embed" in line, line
    assert "'cli'" not in line
    assert not out.exists() and (reg / "audit.jsonl").read_bytes() == before
