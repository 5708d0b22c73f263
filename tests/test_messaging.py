"""The resend protocol of ``server/messaging.exchange`` against a SuperLink that loses messages.

A lost message (the SuperLink handed it out and then failed with "database is locked", or lost the
site's reply) cannot be produced on demand with a real SuperLink, so ``QueueGrid`` plays one: each
node takes its messages one at a time, oldest first, as a Flower 1.41 SuperNode does, each taking
``busy_s`` seconds; the messages named in ``lose`` are taken and never answered.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from common.protocol import wire
from server.audit import AuditLog, read_entries
from server.messaging import exchange, request


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the task's run id; a ServerApp process has one, this test sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class QueueGrid:
    """Sites that answer in order, ``busy_s[message_type]`` seconds each; ``lose`` (request keys, or
    ``"probe"`` for the first probe) are taken from the queue and never answered; ``keys`` maps a
    request's nonce to its key."""

    def __init__(self, busy_s: dict[str, float], lose: set[str], keys: dict[str, str]) -> None:
        self.busy_s, self.lose, self.keys = busy_s, set(lose), keys
        self.queue: dict[int, list[tuple[str, Message]]] = {}
        self.done: dict[str, tuple[float, Message]] = {}
        self.free_at: dict[int, float] = {}
        self.pushed: list[str] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.queue)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.queue.setdefault(msg.metadata.dst_node_id, []).append((mid, msg))
            self.pushed.append(msg.metadata.message_type)
            ids.append(mid)
        return ids

    def _work(self) -> None:
        now = time.monotonic()
        for node, queue in self.queue.items():
            while queue and self.free_at.get(node, 0.0) <= now:
                mid, msg = queue.pop(0)
                config = msg.content["config"]
                key = "probe" if "challenge" in config else self.keys[str(config["nonce"])]
                start = max(self.free_at.get(node, 0.0), now)
                self.free_at[node] = start + self.busy_s.get(msg.metadata.message_type, 0.0)
                if key in self.lose:
                    self.lose.discard(key)
                    continue
                reply = RecordDict({"config": ConfigRecord({"answer": key})})
                self.done[mid] = (self.free_at[node], Message(reply, reply_to=msg))

    def pull_messages(self, ids: Any) -> list[Message]:
        self._work()
        now = time.monotonic()
        ready = [i for i in ids if i in self.done and self.done[i][0] <= now]
        return [self.done.pop(i)[1] for i in ready]


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
