"""``rpe audit report`` files each composition under what happened to THAT composition.

The report groups compositions as delivered to a site, evaluation arms, undelivered, or sent to no
site (``rpe compose``), and auditors compare the counts with the sites' own. It matched a delivery
event to compositions by output hash alone, so every composition with the same output was filed
under the best fate any of them had: on the demo's own registry the evaluation run's ``sim`` arm for
HK (same adapter as the later delivery to HK) counted as a second delivery (segmentation: 2
delivered, 29 evaluation arms, where the runs made 1 and 30), and an identical adapter composed
later by ``rpe compose`` counted as delivered too. Now a delivery names the latest composition
made before it not yet accounted for, an evaluation event the arms made before it; later ones stay
"sent to no site". Both families, on the real two-family registry root with the coordinator's own
audit events appended as the ServerApp appends them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.cli import rpe_run
from support.two_family import FAMILIES, SEG_DIR, build

from server.registry import Registry


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit-kinds")
    built = build(tmp)
    return built["root"], tmp


def target_z(tmp, reg, key: str):
    with Registry(reg, read_only=True) as r:
        z = r.list()[0].z.astype(np.float32) + 0.01
    np.save(tmp / f"{key}.npy", z)
    return tmp / f"{key}.npy"


def compose(capsys, reg, z, out, target: str) -> str:
    argv = ("--registry", str(reg), "--embedding", str(z), "--k", "2", "--target", target, "--out", str(out))
    code, stdout, err = rpe_run(capsys, "compose", *argv, "--json")
    assert code == 0, err
    return json.loads(stdout)["output_sha256"]


def append(reg, event: str, target: str, **fields) -> None:
    """A delivery event as the ServerApp appends it (``server/modes/compose.py``, ``evaluate.py``)."""
    with Registry(reg, chroma="off") as r:
        r.audit.append(event, run_id="77", site=target, target=target, **fields)


def kinds(capsys, top, key: str, target: str) -> list[str]:
    code, out, err = rpe_run(capsys, "audit", "report", "--registry", str(top), "--json")
    assert code == 0, err
    comps = json.loads(out)["families"][FAMILIES[key]["task"]]["compositions"]
    return [c["kind"] for c in comps if c["target"] == target]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_each_composition_is_filed_under_its_own_fate(capsys, root, key):
    top, tmp = root
    reg = top / SEG_DIR if key == "seg" else top
    z = target_z(tmp, reg, key)
    # 1: an evaluation arm; 2: the compose run's delivery; 3: the same adapter by rpe compose, later
    first = compose(capsys, reg, z, tmp / f"{key}-1", "T")
    append(reg, "composition.delivered", "T", arms=[{"arm": "sim", "output_sha256": first}], output_sha256="ab" * 32)
    second = compose(capsys, reg, z, tmp / f"{key}-2", "T")
    append(reg, "composition.delivered", "T", output_sha256=second)
    third = compose(capsys, reg, z, tmp / f"{key}-3", "T")
    assert first == second == third  # one adapter, three compositions
    assert kinds(capsys, top, key, "T") == ["evaluation", "delivered", "local"]

    code, text, _ = rpe_run(capsys, "audit", "report", "--registry", str(top))
    section = text.split(f"== family {FAMILIES[key]['task']} ==")[1].split("== family")[0]
    delivered = [ln for ln in section.splitlines() if ln.startswith("compositions delivered to a site:")]
    assert delivered == ["compositions delivered to a site: 1"], section


@pytest.mark.parametrize("key", list(FAMILIES))
def test_an_undelivered_composition_then_a_delivered_retry(capsys, root, key):
    """The run's first try failed (undelivered), a retry with the same output was delivered: the first
    stays undelivered, the second is the delivery."""
    top, tmp = root
    reg = top / SEG_DIR if key == "seg" else top
    z = target_z(tmp, reg, key)
    first = compose(capsys, reg, z, tmp / f"{key}-u1", "U")
    append(reg, "composition.undelivered", "U", output_sha256=first, reason="site offline")
    second = compose(capsys, reg, z, tmp / f"{key}-u2", "U")
    append(reg, "composition.delivered", "U", output_sha256=second)
    assert first == second
    assert kinds(capsys, top, key, "U") == ["undelivered", "delivered"]
