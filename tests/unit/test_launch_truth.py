"""A start command checks its inputs before it starts or writes anything, a taken port is named with
its holder at once, a dead process is reported with its log's own error line, and ``status`` lists
every process (the nginx proxy included) alive or dead. No Flower process here: the checks, a real
socket bound by the test, real certificates and keys from ``deploy.tls``, real log text. (A real
SuperNode with another CA, a real SuperLink on a taken port: ``integration/test_fed_run_deployment.py``.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import launch, tls
from deploy.launch import checks
from deploy.launch.errors import LaunchError
from deploy.launch.state import SiteSpec, save_state


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ours = tls.generate(out / "ours", ["a"], ["127.0.0.1"])
    return {
        "ca": ours.ca_cert,
        "server": ours.server_cert,
        "key": ours.sites["a"].private_key,
        "pub": ours.sites["a"].public_key,
    }


# -- input files ------------------------------------------------------------------------------------
def test_a_good_ca_and_key_pass(pki):
    checks.check_ca_cert(pki["ca"])
    checks.check_private_key(pki["key"])


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", ["no such file", "ca.crt"]),
        ("directory", ["not a file"]),
        ("garbage", ["not a PEM certificate"]),
        ("empty", ["not a PEM certificate"]),
        ("not a CA", ["not a CA's"]),
    ],
)
def test_a_bad_ca_is_named(pki, tmp_path, damage, words):
    path = tmp_path / "ca.crt"
    if damage == "directory":
        path.mkdir()
    elif damage == "garbage":
        path.write_text("hello\n")
    elif damage == "empty":
        path.write_text("")
    elif damage == "not a CA":
        path.write_bytes(pki["server"].read_bytes())  # the SuperLink's own certificate
    with pytest.raises(LaunchError) as err:
        checks.check_ca_cert(path)
    assert str(path) in str(err.value) and "--root-certificates" in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", ["no such file"]),
        ("public half", ["public half"]),
        ("garbage", ["not an unencrypted private key"]),
        ("a certificate", ["not an unencrypted private key"]),
    ],
)
def test_a_bad_key_is_named(pki, tmp_path, damage, words):
    path = tmp_path / "a_auth"
    if damage == "public half":
        path = tmp_path / "a_auth.pub"
        path.write_bytes(pki["pub"].read_bytes())
    elif damage == "garbage":
        path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n")
    elif damage == "a certificate":
        path.write_bytes(pki["ca"].read_bytes())
    with pytest.raises(LaunchError) as err:
        checks.check_private_key(path)
    assert str(path) in str(err.value) and "--auth-key" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_coordinator_key_must_be_a_public_key(pki, tmp_path):
    from common.trust.signing import generate_keypair

    generate_keypair(tmp_path, "coord")
    checks.check_public_key(tmp_path / "coord.pub")
    with pytest.raises(LaunchError, match="not a PEM public key"):
        checks.check_public_key(pki["ca"])
    with pytest.raises(LaunchError, match="no such file"):
        checks.check_public_key(tmp_path / "coordinator.pub")


def _spec(tmp_path: Path, **over) -> SiteSpec:
    data = tmp_path / "a.jsonl"
    data.write_text("")
    spec = SiteSpec("a", str(data), "smollm2-135m-instruct", str(tmp_path / "site"))
    for key, value in over.items():
        setattr(spec, key, value)
    return spec


@pytest.mark.parametrize(
    "what, words",
    [
        ("wrong CA file", ["--root-certificates", "not a PEM certificate"]),
        ("missing key", ["--auth-key", "no such file"]),
        ("missing data", ["--data-path", "does not exist"]),
        ("missing model", ["--model-path", "does not exist", "smollm2-135m-instruct"]),
        ("missing coordinator key", ["--coordinator-key", "no such file"]),
        ("bad app pin", ["site 'a'"]),
        ("taken port", ["--port", "already in use by pid"]),
    ],
)
def test_start_supernode_checks_before_writing_or_starting(pki, tmp_path, what, words):
    """Nothing is written (no node-config.toml, no state, no log) and nothing starts."""
    ca, key, spec = pki["ca"], pki["key"], _spec(tmp_path)
    holder = None
    if what == "wrong CA file":
        ca = tmp_path / "ca.crt"
        ca.write_text("not a certificate\n")
    elif what == "missing key":
        key = tmp_path / "nope" / "a_auth"
    elif what == "missing data":
        spec.data_path = str(tmp_path / "no-such-data.jsonl")
    elif what == "missing model":
        spec.model_path = str(tmp_path / "no-model")
    elif what == "missing coordinator key":
        spec.coordinator_key = str(tmp_path / "coordinator.pub")
    elif what == "bad app pin":
        spec.app_sha256 = "not-a-hash"
    elif what == "taken port":
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        spec.port = holder.getsockname()[1]
    workdir = tmp_path / "wd"
    try:
        with pytest.raises(LaunchError) as err:
            launch.start_supernode(workdir, spec, "127.0.0.1:1", ca, key, wait=5, require_coordinator_key=True)
    finally:
        if holder is not None:
            holder.close()
    for word in words:
        assert word in str(err.value), str(err.value)
    if what == "taken port":
        assert f"pid {os.getpid()}" in str(err.value)
    assert not (tmp_path / "site" / "node-config.toml").exists()
    assert not workdir.exists()


def test_the_cli_exits_1_with_the_cause_and_prints_no_pid(pki, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("")
    res = subprocess.run(
        [
            sys.executable, "-m", "deploy.launch", "supernode", "--workdir", str(tmp_path / "wd"),
            "--superlink", "127.0.0.1:1", "--root-certificates", str(pki["ca"]), "--auth-key",
            str(tmp_path / "missing_auth"), "--site-id", "a", "--data-path", str(data),
        ],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert res.returncode == 1, res
    assert "missing_auth" in res.stderr and "no such file" in res.stderr and "PID" not in res.stdout


# -- ports ------------------------------------------------------------------------------------------
def test_a_taken_port_names_its_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert os.getpid() in checks.port_holders(port)
        with pytest.raises(LaunchError) as err:
            checks.check_port_free("127.0.0.1", port)
        assert f"127.0.0.1:{port} is already in use by pid {os.getpid()}" in str(err.value)
        assert "choose another port" in str(err.value)
    checks.check_port_free("127.0.0.1", port)  # free again


def test_a_port_bound_on_every_address_is_taken_for_loopback_too():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        with pytest.raises(LaunchError, match="already in use"):
            checks.check_port_free("127.0.0.1", s.getsockname()[1])


def test_start_superlink_refuses_a_taken_port_at_once_and_writes_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for proxy, words in ((False, ["--port", str(port)]), (True, ["--port (the proxy's public port)"])):
            with pytest.raises(LaunchError) as err:
                launch.start_superlink(tmp_path / "wd", "127.0.0.1", port, proxy=proxy, timeout=5)
            for word in words:
                assert word in str(err.value)
            assert f"pid {os.getpid()}" in str(err.value)
        with pytest.raises(LaunchError, match="--inner-port"):
            launch.start_superlink(tmp_path / "wd", "127.0.0.1", launch.free_port(), proxy=True, inner_port=port)
    assert not (tmp_path / "wd").exists()


# -- the log's own error line --------------------------------------------------------------------
WRONG_CA_LOG = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
INFO:     Uvicorn running on http://127.0.0.1:40621 (Press CTRL+C to quit)
\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)
The SuperNode could not establish a connection to the SuperLink.

For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>
INFO:     Shutting down
"""

BIND_LOG = """INFO :      Starting Flower SuperLink
Traceback (most recent call last):
  File "x.py", line 1, in <module>
OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 9093): address already in use
"""


def test_error_line_reads_the_log_from_where_this_start_began(tmp_path):
    log = tmp_path / "supernode-a.log"
    log.write_text(WRONG_CA_LOG)
    offset = checks.log_size(log)
    line = checks.error_line(checks.log_lines(log))
    assert line.startswith("exit code 305: Failed to initialize the connection to the SuperLink.")
    assert "CERTIFICATE_VERIFY_FAILED" in line and "\x1b" not in line and "For more" not in line
    with open(log, "a") as fh:
        fh.write(BIND_LOG)
    assert checks.error_line(checks.log_lines(log, offset)).startswith("OSError: [Errno 98]")
    assert checks.error_line([]) == "(the log is empty)"


# -- status: every process, the proxy included ---------------------------------------------------
def test_status_lists_every_process_alive_or_dead(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        start = launch.proc_start_time(alive.pid)

        def rec(pid: int, st: int | None, **kw):
            return {"pid": pid, "pgid": pid, "start_time": st, "cmd": ["x"], "log": str(tmp_path / "x.log"), **kw}

        save_state(
            tmp_path,
            {
                "workdir": str(tmp_path),
                "superlink": rec(dead.pid, 1, address="127.0.0.1:1", port=1),
                "proxy": rec(alive.pid, start, host="0.0.0.0", port=9093),
                "sites": {"a": rec(alive.pid, start, port=9094), "b": rec(dead.pid, 1, port=9095, stopped=True)},
            },
        )
        procs = launch.status(tmp_path)["processes"]
        assert procs["proxy"]["state"] == "alive" and procs["proxy"]["address"] == "0.0.0.0:9093"
        assert procs["superlink"]["state"] == "dead" and procs["superexec"]["state"] == "dead"
        assert procs["supernode-a"]["state"] == "alive" and procs["supernode-b"]["state"] == "dead"
        assert procs["supernode-b"]["stopped_on_purpose"] is True
        assert all(p["running"] == (p["state"] == "alive") for p in procs.values())
    finally:
        alive.kill()
        alive.wait()


def test_a_coordinator_key_not_made_yet_is_a_warning_unless_required(pki, tmp_path, capsys):
    spec = _spec(tmp_path, coordinator_key=str(tmp_path / "registry" / "coordinator.pub"))
    launch.check_site_inputs(spec, pki["ca"], pki["key"])
    assert "refuses every delivery until it does" in capsys.readouterr().err
    with pytest.raises(LaunchError, match="--coordinator-key"):
        launch.check_site_inputs(spec, pki["ca"], pki["key"], require_coordinator_key=True)
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "coordinator.pub").write_bytes(pki["ca"].read_bytes())  # exists, but no key
    with pytest.raises(LaunchError, match="not a PEM public key"):
        launch.check_site_inputs(spec, pki["ca"], pki["key"])


def test_up_checks_every_site_before_writing_anything(tmp_path):
    tiny_model_dir = "smollm2-135m-instruct"  # a packaged name: accepted without a directory
    data = tmp_path / "a.jsonl"
    data.write_text("")
    good = SiteSpec("a", str(data), str(tiny_model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        for bad, words in (
            (
                SiteSpec("b", str(tmp_path / "missing.jsonl"), str(tiny_model_dir)),
                ["site 'b': data path", "does not exist"],
            ),
            (SiteSpec("b", str(data), str(tmp_path / "no-model")), ["--model-path", "does not exist"]),
            (SiteSpec("b", str(data), str(tiny_model_dir), port=s.getsockname()[1]), ["already in use by pid"]),
            (SiteSpec("b/x", str(data), str(tiny_model_dir)), ["b/x"]),
        ):
            with pytest.raises((LaunchError, tls.TlsError)) as err:
                launch.up(tmp_path / "wd", [good, bad], port=launch.free_port(), timeout=5)
            for word in words:
                assert word in str(err.value), str(err.value)
            assert not (tmp_path / "wd").exists()


def test_both_families_site_inputs_pass(pki, tmp_path):
    """A report site (a JSONL file, the packaged SmolLM2) and a segmentation site (a folder, the
    packaged LiteMedSAM or a checkpoint file) pass the same checks."""
    reports = tmp_path / "reports.jsonl"
    reports.write_text("")
    seg = tmp_path / "seg-site"
    (seg / "images").mkdir(parents=True)
    ckpt = tmp_path / "lite_medsam.pth"
    ckpt.write_bytes(b"\0")
    for spec in (
        SiteSpec("a", str(reports), "smollm2-135m-instruct"),
        SiteSpec("s", str(seg), "litemedsam", extra={"task": "segmentation"}),
        SiteSpec("t", str(seg), str(ckpt), extra={"task": "segmentation"}),
    ):
        launch.check_site_inputs(spec, pki["ca"], pki["key"])
