"""The toy family (:mod:`support.families.toy`) on the ONE in-process grid (:mod:`support.grid`):
three sites h1..h3 with their own toy data and a tiny two-layer model.

Fixture (``tests/conftest.py`` makes it visible to every test): ``toy`` (module scope: registers
the family by its one table line, removes it again after the module). ``run(toy, run_id, **rc)``
runs the real ServerApp ``main`` once; its run report.
"""

from __future__ import annotations

import pytest

from common.families import FAMILIES, register_family
from server.allowlist import AllowList
from support.grid import enrol_keys, flower_task_identity, run_server_app, site_context

SITES = ("h1", "h2", "h3")
RELEASE = {"z-min-examples": 5, "metrics-min-reports": 2}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    from support.families.toy import make_toy_base, write_toy_site

    register_family("toy", "support.families.toy:FAMILY")  # the one table line
    tmp = tmp_path_factory.mktemp("toy-family")
    model = make_toy_base(tmp / "toy-model")
    registry = tmp / "registry"
    allow = AllowList(tmp / "allowlist.json")
    with flower_task_identity():
        nodes = {}
        for i, site in enumerate(SITES, start=301):
            nc = {
                "site-id": site,
                "task": "toy",
                "data-path": str(write_toy_site(tmp / "data" / site, seed=i)),
                "model-path": str(model),
                "site-dir": str(tmp / "sites" / site),
                "threads": 1,
                **RELEASE,
            }
            nodes[i] = site_context(i, enrol_keys(tmp, allow, registry, site, nc))
        yield {"tmp": tmp, "nodes": nodes, "registry": registry, "model": model, "allowlist": allow.path}
    FAMILIES.pop("toy", None)


def run(toy: dict, run_id: int, **rc) -> dict:
    """One run of the real ServerApp over the toy sites (``rc`` names at least the mode)."""
    rc = {
        "registry-dir": str(toy["registry"]),
        "base-model": str(toy["model"]),
        "allowlist": str(toy["allowlist"]),
        "chroma": "off",
        "task": "toy",
        "steps": 15,
        "lora-r": 2,
        "lora-alpha": 4.0,
        "lr": 0.5,
        **rc,
    }
    report, _ = run_server_app(toy["nodes"], run_id, rc)
    return report
