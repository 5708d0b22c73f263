"""deploy/README.md "Several machines: a hospital joins, step by step", run from the document.

Every command of that section is read from the document (``support.doc_commands``), not copied,
and run on the host its block names in its first line (``# on: HOST``), each host a Linux network
namespace (``support.netns``; the coordinator has one public address every site reaches over its
own link). ``# send: HOST:PATH -> HOST:PATH`` lines are the out-of-band file transfers: the hosts
share this machine's file system, so the test copies the file. The blocks that name site a
(steps 2-4) are run for each of the three sites, a and b labelled, c unlabelled, with the site id
replaced. Placeholders (``/srv/rpe``, ``coord.example.org``, the documentation networks, the model
and data paths) are rewritten to this test's, see ``PLACEHOLDERS``. Every command must exit 0.

Then the failures the guide promises: a bundle for another site, a wrong CA, a missing key, a
taken port and a failed enrolment each exit non-zero with the cause in the output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import netns
from support.doc_commands import section_blocks

from deploy import launch

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "deploy" / "README.md"
HEADING = "Several machines: a hospital joins"
SITES = {"a": "ct-head", "b": "mr-head", "c": "ct-thorax"}  # c: unlabelled
HOST_NS = {"coordinator": "coord", "site-a": "site-a", "site-b": "site-b", "site-c": "site-c"}
PUBLIC = "10.231.0.1"
N_TRAIN = 12  # over the sites' default z-min-examples (10)
CMD_TIMEOUT = 900.0

pytestmark = [pytest.mark.slow, pytest.mark.integration]


# -- the document --------------------------------------------------------------------------------


def doc_blocks() -> list[dict]:
    """Each shell block of the section: its host (first line ``# on: HOST``), commands and sends."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    out = []
    for block in section_blocks(DOC, HEADING):
        body = []
        for line in lines[block.line :]:
            if line.lstrip().startswith("```"):
                break
            body.append(line.strip())
        m = re.match(r"^# on: (\S+)$", body[0] if body else "")
        assert m, f"{DOC}:{block.line}: the block's first line must be '# on: HOST'"
        assert m.group(1) in HOST_NS, f"{DOC}:{block.line}: unknown host {m.group(1)!r}"
        sends = [re.match(r"^# send: (\S+):(\S+) -> (\S+):(\S+)$", x) for x in body if x.startswith("# send:")]
        assert all(sends), f"{DOC}:{block.line}: a '# send:' line is not 'HOST:PATH -> HOST:PATH'"
        out.append({"host": m.group(1), "commands": list(block.commands), "sends": [s.groups() for s in sends]})
    return out


def per_site(text: str, site: str) -> str:
    """A site-a block's text for ``site``."""
    for old, new in (
        ("site-a", f"site-{site}"),
        ("--site-id a", f"--site-id {site}"),
        ("incoming/a.json", f"incoming/{site}.json"),
        ("outgoing/a.json", f"outgoing/{site}.json"),
    ):
        text = text.replace(old, new)
    return text


def is_site_template(block: dict) -> bool:
    return block["host"] == "site-a" or any("/a.json" in c for c in block["commands"])


# -- the hosts -----------------------------------------------------------------------------------


#: the coordinator's run-config defaults in the test's copy of the app (its pyproject.toml
#: [tool.flwr.app.config], where an operator sets them): the document's `rpe fed run enroll` then trains
#: the tiny model 4 steps, not the default 40 (the commands themselves stay as the document writes them)
APP_DEFAULTS = {"steps = 40\n": "steps = 4\n"}


def snapshot_app(dst: Path) -> Path:
    """The project as the hosts run it (every rpe command and the app `flwr run` ships), copied so
    that edits to the working tree during the test change neither the pinned hash nor the code;
    its run-config defaults are ``APP_DEFAULTS``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", "common", "client", "server", "deploy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in [*files, "pyproject.toml"]:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst / rel)
    pyproject = (dst / "pyproject.toml").read_text(encoding="utf-8")
    for old, new in APP_DEFAULTS.items():
        assert pyproject.count(old) == 1, f"pyproject.toml: [tool.flwr.app.config] has no single {old.strip()!r}"
        pyproject = pyproject.replace(old, new)
    (dst / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    return dst


def make_data(root: Path) -> None:
    from common.families.report.data import report_groups, write_jsonl

    groups = report_groups()
    for site, group in SITES.items():
        examples = groups[group][:N_TRAIN]
        if site == "c":  # findings only, no impressions written yet
            examples = [dataclasses.replace(e, target=None) for e in examples]
        name = "unlabeled.jsonl" if site == "c" else "train.jsonl"
        write_jsonl(root / f"site-{site}" / "reports" / name, examples)


class Hosts:
    """The topology, the placeholders of the document and a way to run a command on a host."""

    def __init__(self, topo: netns.Topology, base: Path, app: Path, model: Path) -> None:
        self.topo, self.base, self.app = topo, base, app
        self.placeholders = {  # PLACEHOLDERS: document -> this test
            "/srv/rpe": str(base / "srv"),
            "coord.example.org": PUBLIC,
            "192.0.2.0/24": topo.nets["site-a"],
            "198.51.100.0/24": topo.nets["site-b"],
            "203.0.113.0/24": topo.nets["site-c"],
            "/models/smollm2-135m": str(model),
            "/data/site-": str(base / "data" / "site-"),
        }
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=str(app),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            ANONYMIZED_TELEMETRY="False",
        )
        self.env.pop("FLWR_HOME", None)
        self.log = base / "journey.log"

    def path(self, doc_path: str) -> Path:
        return Path(self.fill(doc_path))

    def fill(self, text: str) -> str:
        for old, new in self.placeholders.items():
            text = text.replace(old, new)
        return text

    def run(self, host: str, command: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        cmd = [*self.topo.prefix(HOST_NS[host]), "bash", "-c", self.fill(command)]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.base, timeout=timeout)
        with open(self.log, "a") as fh:
            fh.write(f"\n### [{host}] {self.fill(command)}  -> {res.returncode} in {time.monotonic() - t0:.1f} s\n")
            fh.write(res.stdout[-4000:] + res.stderr[-4000:])
        return res

    def ok(self, host: str, command: str) -> subprocess.CompletedProcess[str]:
        res = self.run(host, command)
        assert res.returncode == 0, (
            f"[{host}] {command}\nexit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
        )
        return res

    def send(self, src_host: str, src: str, dst_host: str, dst: str) -> None:
        s, d = self.path(src), self.path(dst)
        assert s.is_file(), f"# send: {src_host}:{src} does not exist"
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s, d)

    def stop_all(self) -> None:
        srv = self.base / "srv"
        for state in srv.glob("*/launch-state.json") if srv.exists() else []:
            try:
                launch.down(state.parent)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on with the others
                print(f"cleanup of {state.parent}: {exc}", file=sys.stderr)


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """The whole section run from the document; yields the hosts for the failure checks."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    topo = netns.Topology(peers=("site-a", "site-b", "site-c")).create()
    # nginx's workers must reach the operator socket: not under pytest's 0700 temporary root
    base = Path(tempfile.mkdtemp(prefix="rpe-jj-", dir="/tmp"))
    base.chmod(0o755)
    hosts = Hosts(topo, base, snapshot_app(base / "app"), tiny_model_dir)
    try:
        topo.public_address(PUBLIC)
        make_data(base / "data")
        blocks = doc_blocks()
        assert any(b["host"] == "site-c" for b in blocks), "the section never uses the delivery at site c"
        i = 0
        while i < len(blocks):
            if is_site_template(blocks[i]):
                group = []
                while i < len(blocks) and is_site_template(blocks[i]):
                    group.append(blocks[i])
                    i += 1
                for site in SITES:
                    for block in group:
                        host = per_site(block["host"], site)
                        for command in block["commands"]:
                            hosts.ok(host, per_site(command, site))
                        for send in block["sends"]:
                            hosts.send(*(per_site(x, site) for x in send))
                continue
            block = blocks[i]
            for command in block["commands"]:
                hosts.ok(block["host"], command)
            for send in block["sends"]:
                hosts.send(*send)
            i += 1
        yield hosts
    finally:
        hosts.stop_all()
        if hosts.log.exists():  # every command and its output, kept with pytest's temporary files
            shutil.copy(hosts.log, tmp_path_factory.mktemp("join-journey") / "journey.log")
        topo.remove()
        shutil.rmtree(base, ignore_errors=True)


def test_the_documented_journey_ends_with_impressions_from_the_delivered_adapter(journey: Hosts) -> None:
    srv = journey.base / "srv"
    adapters = list((srv / "site-c" / "adapters").glob("rpe-*"))
    assert len(adapters) == 1, adapters
    out = srv / "site-c" / "impressions.jsonl"
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert len(lines) == N_TRAIN
    # the admissions are in the audit log, naming the request and bundle digests
    from deploy.onboard.files import file_digest

    audit = [json.loads(x) for x in (srv / "coord" / "registry" / "audit.jsonl").read_text().splitlines()]
    admitted = {e["site"]: e for e in audit if e["event"] == "site.admitted"}
    assert sorted(admitted) == sorted(SITES)
    for site in SITES:
        request = json.loads((srv / f"site-{site}" / "join-request.json").read_text())
        bundle = json.loads((srv / f"site-{site}" / "join-bundle.json").read_text())
        assert admitted[site]["request_sha256"] == file_digest(request)
        assert admitted[site]["bundle_sha256"] == file_digest(bundle)
    # no site made a CA of its own
    assert not list((srv / "site-a").rglob("ca.key"))


def _new_site(h: Hosts, site: str) -> Path:
    """A fourth site, admitted, on site c's host (its own ClientApp port there)."""
    d = f"/srv/rpe/site-{site}"  # a document path: Hosts.fill makes it this test's
    h.ok("site-c", f"rpe site init --dir {d} --site-id {site}")
    h.ok("coordinator", f"rpe coordinator admit --dir /srv/rpe/coord {d}/join-request.json --out {d}/bundle.json")
    return h.path(d)


def test_a_bundle_for_another_site_and_a_missing_key_are_refused(journey: Hosts) -> None:
    h = journey
    d = _new_site(h, "d")
    res = h.run("site-c", f"rpe site join --dir {d} /srv/rpe/site-a/join-bundle.json")
    assert res.returncode != 0 and "issued for site 'a'" in res.stderr, res.stderr
    assert not (d / "join-bundle.json").exists()
    h.ok("site-c", f"rpe site join --dir {d} {d}/bundle.json")
    key = d / "certs" / "d_auth"
    key.rename(d / "moved-away")
    res = h.run("site-c", f"rpe site start --dir {d} --data-path /data/site-a/reports --port 9095")
    assert res.returncode != 0 and "SuperNode key" in res.stderr and "missing" in res.stderr, res.stderr
    assert not (d / "launch-state.json").exists()


def test_a_site_that_pins_another_ca_exits_non_zero_with_the_tls_error(journey: Hosts) -> None:
    from deploy import tls

    h = journey
    d = _new_site(h, "e")
    bundle = json.loads((d / "bundle.json").read_text())
    ca, _ = tls.make_ca(h.base / "other-ca")
    bundle["ca_cert"] = ca.read_text()
    (d / "wrong-ca.json").write_text(json.dumps(bundle))
    h.ok("site-c", f"rpe site join --dir {d} {d}/wrong-ca.json")
    res = h.run(
        "site-c",
        f"rpe site start --dir {d} --data-path /data/site-a/reports --model-path /models/smollm2-135m --port 9096",
        timeout=180,
    )
    try:
        out = (res.stdout + res.stderr).lower()
        assert res.returncode != 0, res.stdout + res.stderr
        assert any(w in out for w in ("certificate", "tls", "ssl", "handshake")), res.stdout + res.stderr
    finally:
        launch.down(d)


def test_a_coordinator_whose_port_is_taken_says_so(journey: Hosts) -> None:
    h = journey
    d = h.path("/srv/rpe/coord2")
    h.ok(
        "coordinator",
        "rpe coordinator init --dir /srv/rpe/coord2 --address coord.example.org:9093 --base-model /models/smollm2-135m",
    )
    t0 = time.monotonic()
    res = h.run("coordinator", "rpe coordinator start --dir /srv/rpe/coord2", timeout=180)
    try:
        assert res.returncode != 0, res.stdout
        assert "9093" in res.stderr or "10093" in res.stderr, res.stderr
        assert time.monotonic() - t0 < 60, "the port check waited instead of failing at once"
    finally:
        launch.down(d)
    # the first coordinator still serves
    status = json.loads(h.ok("coordinator", "rpe coordinator status --dir /srv/rpe/coord").stdout)
    assert status["processes"]["superlink"]["running"]


def test_an_enrolment_with_a_site_offline_exits_1_naming_it(journey: Hosts) -> None:
    h = journey
    h.ok("site-b", "rpe site stop --dir /srv/rpe/site-b")
    res = h.run("coordinator", "rpe fed run enroll sites=b timeout-query=30 --dir /srv/rpe/coord", timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert re.search(r"\bb\b.*offline", res.stderr), res.stderr  # the cause, named with the site
