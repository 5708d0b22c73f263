"""``flower-supernode`` that asks the SuperLink for work every second when idle: ``python -m
deploy.supernode_main ARGS``.

Why: flwr 1.41's SuperNode sleeps a fixed 3 s after every pull that brought no message. Every
message a site answers therefore waits 1.5 s on average before the site even sees it, and a run
is a chain of such round trips (discovery, then the work, then a probe or a second request): on
the local main job that was 10-20 s of pure waiting per run. One idle pull is a small HTTP request
(the SuperLink answers it from its state database), so a 1 s idle poll costs the SuperLink little.
Everything else is stock ``flower-supernode`` (same flags, same behaviour).
"""

from __future__ import annotations

import inspect
import sys
import time
from typing import Any

from flwr.supernode import start_client_internal as sci

#: seconds an idle SuperNode waits before asking the SuperLink again (flwr's default: 3)
IDLE_POLL_S = 1.0
_FLWR_IDLE_SLEEP_S = 3


class _PollClock:
    """``time`` as flwr's SuperNode loop sees it: its idle sleep shortened, the rest unchanged."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds == _FLWR_IDLE_SLEEP_S else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_idle_poll(seconds: float = IDLE_POLL_S) -> None:
    """Make the SuperNode's idle pull loop sleep ``seconds`` instead of 3 s."""
    if f"time.sleep({_FLWR_IDLE_SLEEP_S})" not in inspect.getsource(sci):
        raise RuntimeError(
            "flwr's SuperNode loop no longer sleeps a fixed 3 s when idle; update deploy/supernode_main.py"
        )
    sci.time = _PollClock(seconds)  # type: ignore[assignment]  # the module's own `import time`


def main() -> int:
    patch_idle_poll()
    from flwr.supernode.cli import flower_supernode  # lazy: imported after the patch it must see

    sys.argv[0] = "flower-supernode"
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
