"""Issue 29: the settings and counters the federation-scale benchmark measures by.

* The SuperNode's idle poll interval is a site setting (``deploy/supernode_main.py``): default 1 s,
  ``poll-interval`` in the node config or ``--poll-interval`` (flag wins), out-of-range or non-numeric
  values refused with a message naming where they came from, before flwr starts; ``deploy.launch
  supernode --poll-interval`` writes it into the node config (kept on restart) and refuses a bad one
  with nothing started.
* ``server.messaging.exchange`` counts what it sent, re-sent, probed and never got an answer to
  (the run report's ``messages``), with the bookkeeping per node instead of scans over every
  answered message.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.grid import QueueGrid

from common.protocol import wire
from deploy import supernode_main as snm
from deploy.launch import commandline
from deploy.launch.state import STATE_FILE, SiteSpec, spec_from_node_config
from server import messaging
from server.messaging import exchange, message_counts, request

REPO = Path(__file__).resolve().parents[2]


def _node_config(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "node-config.toml"
    path.write_text(f'site-id = "a"\n{text}')
    return ["--superlink", "127.0.0.1:9093", "--node-config", str(path)]


def test_the_poll_interval_defaults_to_one_second_and_comes_from_the_node_config(tmp_path: Path) -> None:
    argv = _node_config(tmp_path, "")
    assert snm.poll_interval(argv) == (snm.IDLE_POLL_S, argv) and snm.IDLE_POLL_S == 1.0
    argv = _node_config(tmp_path, "poll-interval = 5\n")
    assert snm.poll_interval(argv) == (5.0, argv)
    # the flag wins and is taken out of what flwr sees
    seconds, rest = snm.poll_interval(["--poll-interval", "2.5", *argv])
    assert seconds == 2.5 and rest == argv
    assert snm.poll_interval(["--poll-interval=0.5", *argv])[0] == 0.5


@pytest.mark.parametrize("bad", ["0", "-1", "61", "nan", "inf", "soon", "true"])
def test_a_bad_poll_interval_is_refused_naming_where_it_came_from(tmp_path: Path, bad: str) -> None:
    with pytest.raises(snm.PollIntervalError, match="--poll-interval"):
        snm.poll_interval(["--poll-interval", bad])
    value = bad if bad in ("true", "nan", "inf") else f'"{bad}"' if bad == "soon" else bad
    argv = _node_config(tmp_path, f"poll-interval = {value}\n")
    with pytest.raises(snm.PollIntervalError, match="node-config.toml: poll-interval"):
        snm.poll_interval(argv)


def test_supernode_main_refuses_a_bad_interval_before_flwr_starts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.supernode_main", "--poll-interval", "0", *_node_config(tmp_path, "")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "0 s is outside 0.1..60 s" in proc.stderr and "Traceback" not in proc.stderr


def test_the_patched_loop_sleeps_the_interval_only_when_idle() -> None:
    clock = snm._PollClock(0.05)
    t0 = time.monotonic()
    clock.sleep(snm._FLWR_IDLE_SLEEP_S)  # flwr's idle sleep
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    clock.sleep(0.2)  # any other sleep is flwr's own
    assert time.monotonic() - t0 >= 0.2
    assert clock.monotonic is time.monotonic


def test_launch_supernode_puts_the_interval_in_the_node_config_and_keeps_it_on_restart() -> None:
    spec = SiteSpec("a", "/data/a")
    commandline._poll_interval(spec, "3")
    nc = spec.node_config()
    assert nc["poll-interval"] == 3.0
    assert spec_from_node_config("a", nc).node_config()["poll-interval"] == 3.0  # restart_site's spec
    commandline._poll_interval(spec, None)
    assert spec.node_config()["poll-interval"] == 3.0


def test_launch_supernode_refuses_a_bad_interval_and_starts_nothing(tmp_path: Path, capsys) -> None:
    rc = commandline.main(
        [
            "supernode",
            "--workdir",
            str(tmp_path / "site"),
            "--superlink",
            "127.0.0.1:9093",
            "--root-certificates",
            str(tmp_path / "ca.crt"),
            "--auth-key",
            str(tmp_path / "a_auth"),
            "--site-id",
            "a",
            "--data-path",
            str(tmp_path),
            "--poll-interval",
            "1000",
        ]
    )
    assert rc == 1
    assert "--poll-interval: 1000 s is outside" in capsys.readouterr().err
    assert not (tmp_path / "site" / STATE_FILE).exists()


@pytest.mark.usefixtures("task_identity")
def test_exchange_counts_sent_resent_probes_and_unanswered(monkeypatch) -> None:
    monkeypatch.setattr(messaging, "_COUNTS", dict.fromkeys(messaging._COUNTS, 0))
    reqs = [request(k, 7, wire.EMBED, {"task": "reports", "embed_layer": -1}) for k in ("a", "b")]
    grid = QueueGrid({wire.EMBED: 0.1}, {"a"}, {r.nonce: r.key for r in reqs})
    out = exchange(grid, reqs, timeout=30.0, poll_s=0.05, probe_after=0.3)
    assert out["a"].ok and out["b"].ok
    counts = message_counts()
    assert counts["sent"] == 2 and counts["resent"] == 1 and counts["replies"] == 2
    assert counts["unanswered"] == 0 and counts["error_replies"] == 0
    # a site that never answers: counted once as unanswered, however often it was re-sent
    reqs = [request("c", 8, wire.EMBED, {"task": "reports", "embed_layer": -1})]
    grid = QueueGrid({wire.EMBED: 0.1}, set(), {})
    grid.queue[8] = []
    grid._work = lambda: None  # type: ignore[method-assign]  # node 8 takes nothing
    out = exchange(grid, reqs, timeout=1.0, poll_s=0.05, probe_after=0.3)
    assert not out["c"].ok
    counts = message_counts()
    assert counts["sent"] == 3 and counts["unanswered"] == 1 and counts["probes"] >= 1


@pytest.mark.usefixtures("task_identity")
def test_max_sites_in_flight_lets_a_site_start_only_when_another_has_answered(monkeypatch) -> None:
    monkeypatch.setenv(messaging.MAX_SITES_ENV, "2")
    reqs = [request(f"s{n}", n, wire.EMBED, {"task": "reports", "embed_layer": -1}) for n in range(1, 6)]
    grid = QueueGrid({wire.EMBED: 0.2}, set(), {r.nonce: r.key for r in reqs})
    starts: list[int] = []  # the size of every push: at most 2 sites at a time, the rest as others finish
    push = grid.push_messages

    def record(messages):
        messages = list(messages)
        starts.append(len(messages))
        return push(messages)

    monkeypatch.setattr(grid, "push_messages", record)
    out = exchange(grid, reqs, timeout=30.0, poll_s=0.05, probe_after=10.0)
    assert all(r.ok for r in out.values())
    assert starts[0] == 2 and sum(starts) == 5 and max(starts) <= 2


@pytest.mark.parametrize("bad", ["-1", "many", "1.5"])
def test_a_bad_max_sites_in_flight_is_refused(monkeypatch, bad: str) -> None:
    monkeypatch.setenv(messaging.MAX_SITES_ENV, bad)
    with pytest.raises(ValueError, match="RPE_MAX_SITES_IN_FLIGHT"):
        messaging.max_sites_in_flight()
    monkeypatch.setenv(messaging.MAX_SITES_ENV, "")
    assert messaging.max_sites_in_flight() == 0


def test_wait_online_outlasts_a_slow_supernode_ls(tmp_path: Path, monkeypatch) -> None:
    """50 SuperNodes starting on 2 loaded cores: one `flwr supernode ls` took over its 60 s and the whole
    deployment was torn down. A CLI that is slow once is waited out; the deadline decides."""
    from deploy.launch import sites
    from deploy.launch.errors import LaunchError
    from deploy.launch.state import save_state

    save_state(tmp_path, {"flwr_home": str(tmp_path), "registered": {"a": 7}, "sites": {}})
    answers = iter([subprocess.TimeoutExpired(["flwr"], 60.0), {7: "online"}])

    def status(*_: object) -> dict[int, str]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(sites, "supernode_status", status)
    assert sites.wait_online(tmp_path, ["a"], timeout=30.0) == {"a": 7}

    def always_slow(*_: object) -> dict[int, str]:
        raise subprocess.TimeoutExpired(["flwr"], 0.01)

    monkeypatch.setattr(sites, "supernode_status", always_slow)
    with pytest.raises(LaunchError, match="did not answer in time"):
        sites.wait_online(tmp_path, ["a"], timeout=0.2)


def test_a_registration_that_times_out_is_tried_again(tmp_path: Path, monkeypatch) -> None:
    """100 `flwr supernode register` processes on 2 loaded cores: one outlived its 60 s and the whole
    deployment was torn down. The retry of a registration that did go through answers "already in use"."""
    from deploy.launch import flower_cli
    from deploy.launch.errors import LaunchError

    answers = iter([subprocess.TimeoutExpired(["flwr"], 60.0), {"success": False, "error-message": "already in use"}])

    def cli(*_: object, **__: object) -> dict:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(flower_cli, "flwr_cli", cli)
    assert flower_cli.register_site(tmp_path, tmp_path / "a_auth.pub", "a") is None

    def slow(*_: object, **__: object) -> dict:
        raise subprocess.TimeoutExpired(["flwr"], 60.0)

    monkeypatch.setattr(flower_cli, "flwr_cli", slow)
    with pytest.raises(LaunchError, match="did not answer in 3 tries"):
        flower_cli.register_site(tmp_path, tmp_path / "a_auth.pub", "a")


# -- nginx sized for the federation (issue 29) ---------------------------------------------------


def _proxy_spec(tmp_path: Path, bundle, max_sites: int):
    from deploy import proxy

    return proxy.ProxySpec(
        tmp_path / f"p{max_sites}",
        "127.0.0.1",
        9093,
        10093,
        bundle.server_cert,
        bundle.server_key,
        bundle.ca_cert,
        max_sites=max_sites,
    )


def test_nginx_connections_are_sized_for_the_sites_and_nginx_accepts_the_config(tmp_path: Path) -> None:
    """Each site holds up to ``CONNECTIONS_PER_SITE`` connections at nginx (its keep-alive and
    heartbeat connections, each with an upstream one in flight); the fixed 512 of before ran out at
    ~128 sites. The generated config must give every site its share plus spare, with open files
    for two descriptors per connection, and real nginx must accept it."""
    import re
    import shutil

    from deploy import proxy, tls

    bundle = tls.generate(tmp_path / "tls", [])
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for n in (10, 100, proxy.DEFAULT_MAX_SITES, 1000):
        spec = _proxy_spec(tmp_path, bundle, n)
        conf = proxy.render_config(spec)
        conns = int(re.search(r"worker_connections (\d+);", conf).group(1))
        nofile = int(re.search(r"worker_rlimit_nofile (\d+);", conf).group(1))
        assert conns >= proxy.CONNECTIONS_PER_SITE * n + 64 and conns >= 512, (n, conns)
        assert nofile >= 2 * conns, (n, conns, nofile)
        if n == proxy.DEFAULT_MAX_SITES and Path(nginx).exists():
            path = proxy.write_config(spec)
            pre = str(spec.prefix.resolve())
            res = subprocess.run(
                [nginx, "-t", "-q", "-p", pre, "-c", str(path), "-e", f"{pre}/logs/error.log"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert res.returncode == 0, res.stderr
    assert "worker_connections 1128;" in proxy.render_config(_proxy_spec(tmp_path, bundle, 250))


@pytest.mark.parametrize("bad", [0, -5, True, 2.5])
def test_a_bad_max_sites_is_refused(tmp_path: Path, bad) -> None:
    from deploy import proxy, tls

    bundle = tls.generate(tmp_path / "tls", [])
    with pytest.raises(proxy.ProxyConfigError, match="max_sites"):
        proxy.render_config(_proxy_spec(tmp_path, bundle, bad))


def test_the_operator_sizes_the_proxy_with_an_environment_variable(tmp_path: Path, monkeypatch) -> None:
    """``$RPE_PROXY_MAX_SITES`` sizes nginx for more sites than the default; a bad value is refused by
    ``start_superlink`` naming the variable, before any certificate is written or process started."""
    from deploy import launch, proxy, tls
    from deploy.launch.errors import LaunchError
    from deploy.launch.processes import free_port

    bundle = tls.generate(tmp_path / "tls", [])
    monkeypatch.setenv(proxy.MAX_SITES_ENV, "400")
    spec = proxy.ProxySpec(
        tmp_path / "p", "127.0.0.1", 9093, 10093, bundle.server_cert, bundle.server_key, bundle.ca_cert
    )
    assert spec.max_sites == 400 and "worker_connections 1728;" in proxy.render_config(spec)
    for bad in ("many", "0", "-3", "2.5"):
        monkeypatch.setenv(proxy.MAX_SITES_ENV, bad)
        work = tmp_path / f"w{bad}"
        with pytest.raises(LaunchError, match="RPE_PROXY_MAX_SITES"):
            launch.start_superlink(work, port=free_port(), proxy=True)
        assert not work.exists() or not any(work.rglob("*")), sorted(work.rglob("*"))
