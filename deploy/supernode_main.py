"""``flower-supernode`` whose idle poll interval is a site setting: ``python -m deploy.supernode_main
[--poll-interval SECONDS] ARGS``.

Why: flwr 1.41's SuperNode sleeps a fixed 3 s after every pull that brought no message. Every
message a site answers therefore waits 1.5 s on average before the site even sees it, and a run
is a chain of such round trips (discovery, then the work, then a probe or a second request): on
the local main job that was 10-20 s of pure waiting per run. So the idle sleep is
:data:`IDLE_POLL_S` (1 s) by default, and the operator of a site can change it:

- ``--poll-interval SECONDS`` here (``deploy.launch supernode --poll-interval``), or
- ``poll-interval = SECONDS`` in the node config file (``--node-config``), which a restarted
  SuperNode (``deploy.launch start-site``) reads again.

The trade-off (benchmarks/FEDERATION_SCALE.md): a site with interval *p* sees a message *p*/2
later on average, and while idle costs the SuperLink one ``pull-messages`` request (an HTTP round
trip through the proxy and a read of the SuperLink's SQLite state) every *p* seconds. At a hundred
sites on one coordinator, 1 s means 100 requests a second before any work is done; 3-5 s cuts that
load 3-5 times for 1-2 s more latency per message. Everything else is stock ``flower-supernode``
(same flags, same behaviour; a message that arrives is handled at once, with no sleep).
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from pathlib import Path
from typing import Any

import tomllib
from flwr.supernode import start_client_internal as sci

#: seconds an idle SuperNode waits before asking the SuperLink again, unless the site sets
#: ``poll-interval`` (flwr's own value: 3)
IDLE_POLL_S = 1.0
#: the interval a site may choose: shorter floods the SuperLink, longer makes every message wait
POLL_RANGE_S = (0.1, 60.0)
#: the node-config key (and, as ``--poll-interval``, the flag) that sets it
POLL_KEY = "poll-interval"
_FLWR_IDLE_SLEEP_S = 3


class PollIntervalError(ValueError):
    """A poll interval that is not a number of seconds in :data:`POLL_RANGE_S`."""


class _PollClock:
    """``time`` as flwr's SuperNode loop sees it: its idle sleep changed, the rest unchanged."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds == _FLWR_IDLE_SLEEP_S else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_poll_interval(value: Any, where: str) -> float:
    """``value`` as seconds, or :class:`PollIntervalError` naming ``where`` it came from."""
    low, high = POLL_RANGE_S
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise PollIntervalError(f"{where}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise PollIntervalError(
            f"{where}: {seconds:g} s is outside {low:g}..{high:g} s (default {IDLE_POLL_S:g} s; see "
            "deploy/supernode_main.py for the latency / SuperLink-load trade-off)"
        )
    return seconds


def poll_interval(argv: list[str]) -> tuple[float, list[str]]:
    """The idle poll interval these ``flower-supernode`` arguments ask for, and the arguments without
    ``--poll-interval`` (which flwr does not know). The flag wins over the node config file's
    ``poll-interval``; neither: :data:`IDLE_POLL_S`."""
    rest: list[str] = []
    flag: str | None = None
    it = iter(argv)
    for arg in it:
        if arg == "--poll-interval":
            flag = next(it, None)
            if flag is None:
                raise PollIntervalError("--poll-interval needs a number of seconds")
        elif arg.startswith("--poll-interval="):
            flag = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if flag is not None:
        return check_poll_interval(flag, "--poll-interval"), rest
    config = _node_config_file(rest)
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            data = {}  # flwr reads the same file and reports what is wrong with it
        if POLL_KEY in data:
            return check_poll_interval(data[POLL_KEY], f"{config}: {POLL_KEY}"), rest
    return IDLE_POLL_S, rest


def _node_config_file(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--node-config" and i + 1 < len(argv) else None
        if arg.startswith("--node-config="):
            value = arg.split("=", 1)[1]
        if value and Path(value).is_file():
            return Path(value)
    return None


def patch_idle_poll(seconds: float = IDLE_POLL_S) -> None:
    """Make the SuperNode's idle pull loop sleep ``seconds`` instead of 3 s."""
    if f"time.sleep({_FLWR_IDLE_SLEEP_S})" not in inspect.getsource(sci):
        raise RuntimeError(
            "flwr's SuperNode loop no longer sleeps a fixed 3 s when idle; update deploy/supernode_main.py"
        )
    sci.time = _PollClock(seconds)  # type: ignore[assignment]  # the module's own `import time`


def main(argv: list[str] | None = None) -> int:
    try:
        seconds, rest = poll_interval(list(sys.argv[1:] if argv is None else argv))
    except PollIntervalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    patch_idle_poll(seconds)
    from deploy.warm_clientapp import start_server

    start_server()  # a warm starter for this site's ClientApps (deploy/warm_clientapp.py)
    from flwr.supernode.cli import flower_supernode  # lazy: imported after the patch it must see

    sys.argv[:] = ["flower-supernode", *rest]
    print(f"[rpe] idle poll interval {seconds:g} s", file=sys.stderr, flush=True)
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
