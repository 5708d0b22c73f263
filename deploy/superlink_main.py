"""``flower-superlink`` with a longer sqlite busy timeout: ``python -m deploy.superlink_main ARGS``.

Why: flwr 1.41 keeps the SuperLink's state in sqlite with ``busy_timeout = 5000``. On a small
machine shared with many SuperNodes, one request can hold the write lock for longer than that,
because the SuperLink's request threads share one GIL while large replies are pushed. A request that
waits that long gets "database is locked" and an HTTP 500, and flwr's SuperNodes and SuperExec exit
on a single 500. In the 2-core main job this took sites offline and killed a ServerApp mid-run.
Waiting longer for the lock turns that 500 into a short delay.

With ``$RPE_SUPERLINK_SOCKET`` set (``deploy.launch`` always sets it) the same server also listens on
that Unix socket, and its TCP port answers only the Fleet API (``deploy/operator_socket.py``: the
Control and Runtime APIs are for the coordinator's own account and its operators, not for every
local user). Everything else is stock ``flower-superlink``.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

from flwr.supercore import sql_mixin

from deploy.operator_socket import SOCKET_ENV, serve_tcp_and_socket

#: how long a SuperLink request waits for sqlite's write lock before failing (flwr's default: 5 s)
BUSY_TIMEOUT_MS = 60_000


def patch_busy_timeout(ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make every sqlite connection flwr opens from now on wait ``ms`` for a lock."""
    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if not any(key == "busy_timeout" for key, _ in pragmas):
        raise RuntimeError("flwr's sqlite pragmas no longer set busy_timeout; update deploy/superlink_main.py")
    sql_mixin.SQLITE_PRAGMAS = tuple(  # read by its connect hook on every new connection
        (key, str(ms)) if key == "busy_timeout" else (key, value) for key, value in pragmas
    )


def main() -> int:
    patch_busy_timeout()
    from flwr.superlink.cli import flower_superlink  # lazy: imported after the patch it must see

    if os.environ.get(SOCKET_ENV):
        module = importlib.import_module("flwr.superlink.cli.flower_superlink")
        # flwr calls ``uvicorn.run(app=..., host=..., port=..., ssl_*=...)`` through this name
        module.uvicorn = SimpleNamespace(run=serve_tcp_and_socket(os.environ[SOCKET_ENV]))  # type: ignore[attr-defined]
    sys.argv[0] = "flower-superlink"
    return int(flower_superlink() or 0)


if __name__ == "__main__":
    sys.exit(main())
