"""The resend protocol of ``server/messaging.exchange`` against a SuperLink that loses messages.

A lost message (the SuperLink handed it out and then failed with "database is locked", or lost the
site's reply) cannot be produced on demand with a real SuperLink, so ``QueueGrid`` plays one: each
node takes its messages one at a time, oldest first, as a Flower 1.41 SuperNode does, each taking
``busy_s`` seconds; the messages named in ``lose`` are taken and never answered.
"""

from __future__ import annotations

import time

import pytest
from support.grid import QueueGrid

from common.protocol import wire
from server.audit import AuditLog, read_entries
from server.messaging import exchange, request

pytestmark = pytest.mark.usefixtures("task_identity")


def _setup(keys: list[str], busy_s: float, lose: set[str], node: int = 7) -> tuple[QueueGrid, list]:
    reqs = [request(k, node, wire.EMBED, {"task": "reports", "embed_layer": -1}) for k in keys]
    return QueueGrid({wire.EMBED: busy_s}, lose, {r.nonce: r.key for r in reqs}), reqs


def test_a_lost_last_message_is_resent_after_a_probe_not_after_the_timeout(tmp_path) -> None:
    grid, reqs = _setup(["a", "b"], 0.2, lose={"b"})
    audit = AuditLog(tmp_path / "audit.jsonl")
    t0 = time.monotonic()
    out = exchange(grid, reqs, timeout=60.0, poll_s=0.05, probe_after=0.5, audit=audit, run_id="r1")
    took = time.monotonic() - t0
    assert out["a"].ok and out["b"].ok
    assert out["b"].content["config"]["answer"] == "b"
    assert grid.pushed.count(wire.EMBED) == 3  # a, b, and b once more
    assert grid.pushed.count(wire.WHOAMI) >= 1
    assert took < 20.0, f"the lost message waited {took:.1f} s (the rule before: 5 x the longest answer, >= 120 s)"
    probes = [e for _, e in read_entries(tmp_path / "audit.jsonl") if e["event"] == "probe.answered"]
    assert probes and all(e["message_type"] == wire.WHOAMI and e["run_id"] == "r1" for e in probes)


def test_a_lost_first_message_is_resent_although_the_site_never_answered_before() -> None:
    grid, reqs = _setup(["a"], 0.1, lose={"a"})
    out = exchange(grid, reqs, timeout=30.0, poll_s=0.05, probe_after=0.3)
    assert out["a"].ok
    assert grid.pushed.count(wire.EMBED) == 2


def test_a_busy_site_is_probed_but_its_message_is_not_resent() -> None:
    # the answer takes 1.5 s, the probe goes out after 0.3 s and waits behind it: no resend
    grid, reqs = _setup(["a"], 1.5, lose=set())
    out = exchange(grid, reqs, timeout=30.0, poll_s=0.05, probe_after=0.3)
    assert out["a"].ok
    assert grid.pushed.count(wire.EMBED) == 1
    assert grid.pushed.count(wire.WHOAMI) >= 1


def test_a_lost_probe_is_replaced_and_the_lost_message_still_recovered() -> None:
    grid, reqs = _setup(["a"], 0.1, lose={"a", "probe"})
    out = exchange(grid, reqs, timeout=30.0, poll_s=0.05, probe_after=0.3)
    assert out["a"].ok
    assert grid.pushed.count(wire.EMBED) == 2
    assert grid.pushed.count(wire.WHOAMI) >= 2
