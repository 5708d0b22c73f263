"""The ONE in-process grid of the tests: the real ServerApp ``main`` and the real ClientApp
handlers in this process, no SuperLink, no network.

* ``LocalGrid``: a Flower ``Grid`` that delivers each message straight to a site's ClientApp.
* ``QueueGrid``: a Grid whose sites answer in order and can lose messages (the resend protocol).
* ``FakeGrid``: a Grid whose sites answer every request at once with ``respond(request)`` (hostile
  replies, in ``test_hostile.py``).
* ``flower_task_identity()`` / the ``task_identity`` fixture: the run id Flower stamps on messages
  (a ServerApp process has one; a test in this process sets it).
* ``enrol_keys``: a site's signing key on the allow-list and its SuperNode key on record, as
  ``launch.up`` does.
* ``site_context``: a site's Flower ``Context`` for a ``LocalGrid``.
* ``run_server_app``: one run of the real ServerApp ``main`` over a ``LocalGrid``; its run report.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict


@contextlib.contextmanager
def flower_task_identity() -> Iterator[None]:
    """Flower stamps messages with the task's run id; a ServerApp process has one, a test sets it (1, 1, 1)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the task's run id; a ServerApp process has one, this test sets it.

    Not autouse: a module that needs it for every test says ``pytestmark = pytest.mark.usefixtures("task_identity")``.
    """
    with flower_task_identity():
        yield


class LocalGrid:
    """A Grid that delivers each message straight to the site's ClientApp, in this process.

    ``contexts`` maps node id to the site's Flower ``Context``; messages to a node in ``offline``
    get Flower's "Node Unavailable" error; ``tamper(reply)`` may rewrite each reply (a hostile site).
    ``sent`` keeps every message pushed, for assertions on what the coordinator asked.
    """

    def __init__(self, contexts: dict, run_id: int, offline: tuple[int, ...] = (), tamper: Any = None) -> None:
        self.contexts, self.offline, self.tamper = contexts, set(offline), tamper
        self.run = SimpleNamespace(run_id=run_id)
        self.replies: dict = {}
        self.sent: list = []

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Any) -> list[str]:
        import uuid

        from flwr.app import Error, Message

        from client.app import app as client_app

        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self.run.run_id  # as the SuperLink stamps it
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            if node in self.offline:
                self.replies[mid] = Message(Error(5, "Node Unavailable"), reply_to=msg)
            else:
                reply = client_app(msg, self.contexts[node])
                self.replies[mid] = self.tamper(reply) if self.tamper else reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Any) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


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


class FakeGrid:
    """A Flower Grid whose sites answer every request at once with ``respond(request)``."""

    def __init__(self, respond: Callable[[Any], Any]) -> None:
        self.respond = respond
        self.replies: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return []

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.replies[mid] = Message(self.respond(msg), reply_to=msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def enrol_keys(tmp: Path, allow: Any, registry: Path, site: str, nc: dict) -> dict:
    """The site's signing key on the allow-list and its SuperNode key on record, as ``launch.up`` does;
    ``nc`` with the site's SuperNode key and the coordinator key it pins."""
    from common.trust.signing import generate_keypair
    from deploy import tls

    _, pub = generate_keypair(tmp / "sites" / site / "keys", site)
    allow.add(site, pub.read_text())
    # the site's SuperNode key, recorded by the coordinator as it would be at registration
    node_key = tls.make_supernode_keys(tmp / "supernode-keys" / site, site)
    allow.node_keys.add(site, node_key.public_key.read_text())
    return {**nc, "supernode-key": str(node_key.private_key), "coordinator-key": str(registry / "coordinator.pub")}


def site_context(node_id: int, node_config: dict) -> Any:
    """A site's Flower ``Context`` (run 1, empty state) for a ``LocalGrid``."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def run_server_app(
    nodes: dict, run_id: int, rc: dict, offline: tuple[int, ...] = (), tamper: Any = None
) -> tuple[dict, LocalGrid]:
    """One run of the real ServerApp ``main`` over a ``LocalGrid`` of ``nodes`` (node id -> site
    ``Context``, each given the run config ``rc`` and ``run_id``); the run's report
    (``<registry-dir>/runs/<run_id>-<mode>.json``) and the grid."""
    from flwr.app import Context, RecordDict

    from server.app import main

    for ctx in nodes.values():
        ctx.run_config, ctx.run_id = rc, run_id
    grid = LocalGrid(nodes, run_id, offline, tamper)
    main(grid, Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config=rc))
    report = json.loads((Path(rc["registry-dir"]) / "runs" / f"{run_id}-{rc['mode']}.json").read_text())
    return report, grid
