"""A site's ClientApp process answers a whoami without loading the SuperNode or torch. (Process
lifetimes: tests/integration/test_lifetime.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_the_site_clientapp_loads_neither_the_supernode_nor_torch_for_a_whoami(tmp_path: Path) -> None:
    """Every message a site answers starts a fresh ClientApp process. The site's ``flwr-clientapp``
    takes flwr's entry point without ``flwr.supernode.cli``'s ``__init__`` (which imports the whole
    SuperNode: its SQL object store, alembic, gRPC servers), and a whoami, the first message of every
    run, imports no torch: both were seconds of CPU per site per run on the main job."""
    code = """
import sys, json
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.pin import _clientapp_entry, _install_guard
_install_guard()
entry = _clientapp_entry()
from client.app import app
from common.protocol import wire
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
msg = Message(wire.build_request(wire.WHOAMI, {"nonce": "n1", "challenge": "c" * 64}), dst_node_id=1,
              message_type=wire.WHOAMI)
msg.metadata.__dict__["_message_id"] = "m1"
nc = {"site-id": "a", "data-path": sys.argv[1], "site-dir": sys.argv[2], "threads": 1, "compute-dtype": "auto"}
reply = app(msg, Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={}))
got = {"entry": entry.__module__, "supernode": "flwr.supernode.cli.flower_supernode" in sys.modules,
       "torch": "torch" in sys.modules, "answered": reply.has_content()}
import torch  # what a later handler would do: the site's thread limit still holds
got["threads"] = torch.get_num_threads()
print(json.dumps(got))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "entry": "flwr.supernode.cli.flwr_clientapp",
        "supernode": False,
        "torch": False,
        "answered": True,
        "threads": 1,
    }
