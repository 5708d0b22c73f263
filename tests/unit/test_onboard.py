"""Onboarding in commands (deploy/onboard/): the join request and bundle checks, and the commands
that need no running SuperLink. Every refusal is checked to change nothing. The full journey with
real SuperLink/SuperNodes in network namespaces: tests/integration/test_join_journey.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy import tls
from deploy.cli import main
from deploy.onboard import files
from deploy.onboard.files import OnboardError


def rpe(*argv: str) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    d = tmp_path / "site-a"
    assert rpe("site", "init", "--dir", d, "--site-id", "a") == 0
    return d


@pytest.fixture
def coord(tmp_path: Path, tiny_model_dir: Path) -> Path:
    d = tmp_path / "coord"
    assert (
        rpe("coordinator", "init", "--dir", d, "--address", "coord.example.org:9093", "--base-model", tiny_model_dir)
        == 0
    )
    return d


def make_bundle(coord: Path, site: str = "a", **over: str) -> dict:
    bundle = {
        "format": files.BUNDLE_FORMAT,
        "site_id": site,
        "superlink": "coord.example.org:9093",
        "ca_cert": (coord / "certs" / "ca.crt").read_text(),
        "coordinator_public_key": (coord / "coordinator.pub").read_text(),
        "app_sha256": "ab" * 32,
        "request_sha256": "cd" * 32,
        "created": files.now_iso(),
    }
    bundle.update(over)
    return bundle


# -- site init ---------------------------------------------------------------------------------------


def test_site_init_makes_keys_and_a_request_but_no_ca(site_dir: Path, capsys) -> None:
    request = files.read_request(site_dir / "join-request.json")
    assert request["site_id"] == "a"
    assert (site_dir / "certs" / "a_auth").stat().st_mode & 0o077 == 0
    assert (site_dir / "keys" / "a.key").stat().st_mode & 0o077 == 0
    assert not list(site_dir.rglob("ca.*")) and not list(site_dir.rglob("server.*"))
    assert "private" not in json.dumps(request).lower()
    before = snapshot(site_dir)
    assert rpe("site", "init", "--dir", site_dir, "--site-id", "a") == 2
    assert "already holds site 'a'" in capsys.readouterr().err
    assert snapshot(site_dir) == before


def test_site_init_refuses_a_bad_site_id(tmp_path: Path, capsys) -> None:
    assert rpe("site", "init", "--dir", tmp_path / "s", "--site-id", "../x") == 2
    assert "site id" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# -- the join request: clean and each kind of damage --------------------------------------------------


def test_a_clean_request_passes(site_dir: Path) -> None:
    data = json.loads((site_dir / "join-request.json").read_text())
    assert files.check_request(data, "r") is data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r.update(format="rpe-join-request/0"), "field 'format'"),
        (lambda r: r.pop("signing_public_key"), "missing field"),
        (lambda r: r.update(extra="x"), "unknown field"),
        (lambda r: r.update(site_id="a/../b"), "site id"),
        (lambda r: r.update(supernode_public_key="ssh-ed25519 AAAA"), "supernode_public_key"),
        (
            lambda r: r.update(signing_public_key="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
            "signing",
        ),
        (lambda r: r["fingerprints"].update(signing="00" * 32), "fingerprints"),
        (lambda r: r.update(site_id=3), "must be a string"),
    ],
)
def test_a_damaged_request_is_refused(site_dir: Path, damage, message: str) -> None:
    data = json.loads((site_dir / "join-request.json").read_text())
    damage(data)
    with pytest.raises(OnboardError, match=message):
        files.check_request(data, "r")


def test_a_request_with_the_wrong_key_type_is_refused(site_dir: Path, tmp_path: Path) -> None:
    data = json.loads((site_dir / "join-request.json").read_text())
    other = tls.make_supernode_keys(tmp_path / "k", "a")
    data["signing_public_key"] = other.public_key.read_text()  # a SuperNode key where the Ed25519 key goes
    with pytest.raises(OnboardError, match="signing_public_key"):
        files.check_request(data, "r")


def test_a_request_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("site a please")
    with pytest.raises(OnboardError, match="not valid JSON"):
        files.read_request(tmp_path / "r.json")
    with pytest.raises(OnboardError, match="does not exist"):
        files.read_request(tmp_path / "missing.json")


# -- coordinator init ------------------------------------------------------------------------------


def test_coordinator_init_makes_the_coordinator_key_up_front(coord: Path, capsys) -> None:
    from server.registry.coordkey import key_paths

    settings = (coord / "coordinator.toml").read_text()
    assert "coord.example.org:9093" in settings
    assert (coord / "coordinator.pub").read_bytes() == key_paths(coord / "registry")[1].read_bytes()
    assert (coord / "certs" / "ca.crt").is_file() and (coord / "certs" / "server.pem").is_file()
    assert json.loads((coord / "allowlist.json").read_text()) == {}
    before = snapshot(coord)
    assert rpe("coordinator", "init", "--dir", coord, "--address", "coord.example.org:9093") == 2
    assert "already holds a coordinator" in capsys.readouterr().err
    assert snapshot(coord) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "coord.example.org"], "HOST:PORT"),
        (["--address", "0.0.0.0:9093"], "HOST:PORT"),
        (["--address", "c:9093", "--site-network", "10.0.0.0/33"], "CIDR"),
        (["--address", "c:9093", "--tls-host", "bad host!"], "tls-host"),
    ],
)
def test_coordinator_init_refuses_bad_settings_and_writes_nothing(tmp_path: Path, capsys, args, message) -> None:
    assert rpe("coordinator", "init", "--dir", tmp_path / "c", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_commands_on_a_directory_that_is_not_a_coordinator_say_so(tmp_path: Path, capsys) -> None:
    for action in ("start", "stop", "status"):
        assert rpe("coordinator", action, "--dir", tmp_path) == 2
        assert "not a coordinator directory" in capsys.readouterr().err


def test_admit_needs_a_running_superlink_and_changes_nothing(coord: Path, site_dir: Path, capsys) -> None:
    before = snapshot(coord)
    assert rpe("coordinator", "admit", "--dir", coord, site_dir / "join-request.json") == 2
    assert "SuperLink is not running" in capsys.readouterr().err
    assert snapshot(coord) == before


def test_admit_refuses_a_key_another_site_holds(coord: Path, site_dir: Path, tmp_path: Path, capsys) -> None:
    from server.allowlist import AllowList

    request = json.loads((site_dir / "join-request.json").read_text())
    AllowList(coord / "allowlist.json").node_keys.add("b", request["supernode_public_key"])
    before = snapshot(coord)
    assert rpe("coordinator", "admit", "--dir", coord, site_dir / "join-request.json") == 2
    assert "already site 'b'" in capsys.readouterr().err
    assert snapshot(coord) == before
    # and a site admitted with other keys needs --replace
    (coord / "supernode-keys.json").write_text("{}")
    other = tmp_path / "other-a"
    assert rpe("site", "init", "--dir", other, "--site-id", "a") == 0
    AllowList(coord / "allowlist.json").add("a", (other / "keys" / "a.pub").read_text())
    assert rpe("coordinator", "admit", "--dir", coord, site_dir / "join-request.json") == 2
    assert "--replace" in capsys.readouterr().err


# -- the join bundle: clean and each kind of damage ------------------------------------------------------


def test_site_join_stores_what_it_pins(coord: Path, site_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "b.json").write_text(json.dumps(make_bundle(coord)))
    assert rpe("site", "join", "--dir", site_dir, tmp_path / "b.json") == 0
    out = capsys.readouterr().out
    assert "coord.example.org:9093" in out and "ab" * 32 in out
    assert (site_dir / "ca.crt").read_text() == (coord / "certs" / "ca.crt").read_text()
    assert (site_dir / "coordinator.pub").read_text() == (coord / "coordinator.pub").read_text()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"site_id": "b"}, "issued for site 'b'"),
        ({"superlink": "0.0.0.0:9093"}, "superlink"),
        ({"superlink": "coord.example.org"}, "superlink"),
        ({"ca_cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "ca_cert"),
        ({"coordinator_public_key": "not a key"}, "coordinator_public_key"),
        ({"app_sha256": "xyz"}, "app_sha256"),
        ({"format": "something/1"}, "format"),
    ],
)
def test_a_damaged_bundle_is_refused_and_nothing_is_stored(
    coord: Path, site_dir: Path, tmp_path: Path, capsys, over, message
) -> None:
    before = snapshot(site_dir)
    (tmp_path / "b.json").write_text(json.dumps(make_bundle(coord, **over)))
    assert rpe("site", "join", "--dir", site_dir, tmp_path / "b.json") == 2
    assert message in capsys.readouterr().err
    assert snapshot(site_dir) == before


def test_a_bundle_whose_ca_is_not_a_ca_is_refused(coord: Path, site_dir: Path) -> None:
    bundle = make_bundle(coord, ca_cert=(coord / "certs" / "server.pem").read_text())
    with pytest.raises(OnboardError, match="not a CA certificate"):
        files.check_bundle(bundle, "b", "a")


# -- site start refuses before starting anything ---------------------------------------------------------


def test_site_start_refuses_without_a_bundle_a_key_or_a_coordinator_key(
    coord: Path, site_dir: Path, tmp_path: Path, capsys
) -> None:
    args = ("site", "start", "--dir", site_dir, "--data-path", tmp_path)
    assert rpe(*args) == 2
    assert "has not joined" in capsys.readouterr().err
    (tmp_path / "b.json").write_text(json.dumps(make_bundle(coord)))
    assert rpe("site", "join", "--dir", site_dir, tmp_path / "b.json") == 0
    (site_dir / "coordinator.pub").unlink()
    assert rpe(*args) == 2
    assert "--no-deliveries" in capsys.readouterr().err
    (site_dir / "certs" / "a_auth").rename(tmp_path / "moved")
    assert rpe(*args, "--no-deliveries") == 2
    err = capsys.readouterr().err
    assert "SuperNode key" in err and "missing" in err
    assert not (site_dir / "launch-state.json").exists()
    assert not (site_dir / "node-config.toml").exists()


def test_site_commands_on_a_directory_that_is_not_a_site_say_so(tmp_path: Path, capsys) -> None:
    for argv in (
        ["join", "--dir", tmp_path, tmp_path / "b.json"],
        ["start", "--dir", tmp_path, "--data-path", tmp_path],
    ):
        assert rpe("site", *argv) == 2
        assert "not a site directory" in capsys.readouterr().err


def test_coordinator_init_makes_every_familys_registry_with_the_one_coordinator_key(
    tmp_path: Path, tiny_model_dir: Path, tiny_sam_dir: Path
) -> None:
    """Both task families: a segmentation delivery is signed with the key the sites pin from the bundle."""
    from common.families import family_registry_dir
    from common.trust.signing import load_private_key, public_key_pem
    from server.registry.coordkey import key_paths

    d = tmp_path / "coord"
    argv = ["--address", "coord.example.org:9093", "--base-model", tiny_model_dir]
    assert rpe("coordinator", "init", "--dir", d, *argv, "--family-base", f"segmentation={tiny_sam_dir}") == 0
    pinned = (d / "coordinator.pub").read_text()
    for family in ("report-text", "segmentation"):
        path = family_registry_dir(d / "registry", family)
        assert (path / "registry.json").is_file(), family
        signer = load_private_key(key_paths(path)[0])
        assert public_key_pem(signer.public_key()) == pinned, family
    assert "segmentation" in (d / "coordinator.toml").read_text()


def test_coordinator_init_refuses_an_unknown_family(tmp_path: Path, capsys) -> None:
    argv = ["--address", "c:9093", "--family-base", "radiology=/m"]
    assert rpe("coordinator", "init", "--dir", tmp_path / "c", *argv) == 2
    assert "segmentation" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_an_admission_entry_keeps_the_audit_log_verifiable(coord: Path, site_dir: Path) -> None:
    from deploy.onboard.coordinator import _audit

    request = files.read_request(site_dir / "join-request.json")
    entry = _audit(
        coord / "registry",
        "site.admitted",
        site="a",
        request_sha256=files.file_digest(request),
        bundle_sha256=files.file_digest(make_bundle(coord)),
    )
    assert entry["event"] == "site.admitted" and entry["seq"] >= 1
    assert rpe("audit", "verify", "--registry", coord / "registry") == 0


# -- site start: the task family and its node-config keys (--task, --option, --check) -----------------


def joined_site(coord: Path, site_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "b.json").write_text(json.dumps(make_bundle(coord)))
    assert rpe("site", "join", "--dir", site_dir, tmp_path / "b.json") == 0
    return site_dir


def volumes(root: Path) -> Path:
    """A site's own NIfTI volume with its label map (the shared TotalSegmentator CT)."""
    from common.dataroot import data_root

    src = data_root() / "totalsegmentator-test"
    for sub, name in (("images", "example_ct_sm.nii.gz"), ("labels", "example_seg.nii.gz")):
        (root / sub).mkdir(parents=True)
        (root / sub / "case1.nii.gz").write_bytes((src / name).read_bytes())
    return root


def csv_reports(root: Path, empty_findings: bool = False) -> Path:
    from common.families.report.data import Example, write_jsonl

    root.mkdir(parents=True)
    rows = "".join(f"A{i};Lungs clear, finding {i}.;Normal {i}.\n" for i in range(12))
    if empty_findings:
        rows += "A99;;Normal.\n"
    (root / "train.csv").write_text("Accession;Befund;Beurteilung\n" + rows, encoding="utf-8")
    write_jsonl(root / "eval.jsonl", [Example(f"Effusion {i}.", "Effusion.", "xray-chest", f"e{i}") for i in range(10)])
    return root


REPORT_OPTIONS = (
    "--option",
    "report-columns=uid=Accession,prompt=Befund,target=Beurteilung",
    "--option",
    "report-group=xray-chest",
)
SEG_OPTIONS = ("--task", "segmentation", "--option", "seg-dataset=volumes", "--option", "seg-mask-foreground=nonzero")


def test_a_segmentation_sites_start_writes_the_familys_keys(
    coord: Path, site_dir: Path, tmp_path: Path, capsys
) -> None:
    """The node config `start` runs the SuperNode with (site_spec) and the one `--check` prints and
    checks: task = segmentation, its keys, the family's model; nothing written or started by --check."""
    from deploy.onboard.site import site_spec

    joined_site(coord, site_dir, tmp_path)
    data = volumes(tmp_path / "volumes")
    nc = site_spec(site_dir, str(data), tasks=["segmentation"], options=list(SEG_OPTIONS[3::2])).node_config()
    assert nc["task"] == "segmentation" and nc["seg-dataset"] == "volumes"
    assert nc["seg-mask-foreground"] == "nonzero" and nc["model-path"] == "litemedsam"
    assert nc["coordinator-key"] == str(site_dir / "coordinator.pub") and nc["app-sha256"] == "ab" * 32
    before = snapshot(site_dir)
    assert rpe("site", "start", "--dir", site_dir, "--data-path", data, *SEG_OPTIONS, "--check") == 0
    out = capsys.readouterr().out
    for line in ('task = "segmentation"', 'seg-dataset = "volumes"', 'model-path = "litemedsam"'):
        assert f"  {line}\n" in out, out
    assert f"segmentation: {data}: ok" in out and "would use: 22 train, 8 eval" in out
    assert snapshot(site_dir) == before and not (site_dir / "node-config.toml").exists()
    # the data check of --check is the family's: a label map naming no object is a problem, exit 1
    bad = ("--task", "segmentation", "--option", "seg-dataset=volumes", "--option", "seg-mask-foreground=250")
    assert rpe("site", "start", "--dir", site_dir, "--data-path", data, *bad, "--check") == 1
    assert "no axial slice holds the object" in capsys.readouterr().out and snapshot(site_dir) == before


def test_a_report_site_with_report_columns(coord: Path, site_dir: Path, tmp_path: Path, capsys) -> None:
    from deploy.onboard.site import site_spec

    joined_site(coord, site_dir, tmp_path)
    data = csv_reports(tmp_path / "reports")
    nc = site_spec(site_dir, str(data), options=list(REPORT_OPTIONS[1::2])).node_config()
    assert nc["task"] == "report-text" and nc["model-path"] == "smollm2-135m-instruct"
    assert nc["report-columns"] == "uid=Accession,prompt=Befund,target=Beurteilung"
    assert nc["report-group"] == "xray-chest"
    args = ("site", "start", "--dir", site_dir, "--data-path", data, *REPORT_OPTIONS)
    assert rpe(*args, "--check") == 0
    out = capsys.readouterr().out
    assert 'report-columns = "uid=Accession,prompt=Befund,target=Beurteilung"' in out
    assert "report-text: " in out and "would use: 12 train, 10 eval, 0 unlabeled" in out
    # without the mapping the CSV cannot be read: the check says so (exit 1), as `rpe data check`
    assert rpe("site", "start", "--dir", site_dir, "--data-path", data, "--check") == 1
    assert "problem:" in capsys.readouterr().out
    bad = csv_reports(tmp_path / "bad", empty_findings=True)
    assert rpe("site", "start", "--dir", site_dir, "--data-path", bad, *REPORT_OPTIONS, "--check") == 1
    assert "train.csv: row at line 14: the findings cell ('Befund') is empty" in capsys.readouterr().out
    assert not (site_dir / "node-config.toml").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--task", "segmentation", "--option", "seg-mask-forground=1"), "did you mean 'seg-mask-foreground'"),
        (("--option", "report-colums=prompt=Befund"), "did you mean 'report-columns'"),
        (("--option", "seg-dataset=volumes"), "a key of the segmentation family: add --task segmentation"),
        (("--task", "segmentaton"), "did you mean 'segmentation'"),
        (("--option", "report-group"), "is not KEY=VALUE"),
        (("--option", "report-group=a", "--option", "report-group=b"), "given twice"),
    ],
)
@pytest.mark.parametrize("check", [False, True])
def test_an_unknown_family_or_key_is_refused_and_nothing_is_started(
    coord: Path, site_dir: Path, tmp_path: Path, capsys, argv, message, check
) -> None:
    joined_site(coord, site_dir, tmp_path)
    before = snapshot(site_dir)
    extra = ("--check",) if check else ()
    assert rpe("site", "start", "--dir", site_dir, "--data-path", tmp_path, *argv, *extra) == 2
    assert message in capsys.readouterr().err
    assert snapshot(site_dir) == before and not (site_dir / "launch-state.json").exists()


def test_site_start_check_runs_before_the_site_joined(site_dir: Path, tmp_path: Path, capsys) -> None:
    """A site can check its data right after `rpe site init` (no bundle yet: no app pin, no key)."""
    data = csv_reports(tmp_path / "reports")
    assert rpe("site", "start", "--dir", site_dir, "--data-path", data, *REPORT_OPTIONS, "--check") == 0
    out = capsys.readouterr().out
    assert "would use: 12 train" in out and "app-sha256" not in out and "coordinator-key" not in out
    assert rpe("site", "start", "--dir", site_dir, "--data-path", data, *REPORT_OPTIONS) == 2
    assert "has not joined" in capsys.readouterr().err


def test_the_data_guides_site_start_commands_do_what_it_says(tmp_path: Path, capsys) -> None:
    """docs/DATA.md "Starting the site with these keys": its commands, run from the guide (/srv/rpe
    -> the test's folder) on the guide's own sample files and a NIfTI volume with its label map."""
    import re
    import shlex

    from support.doc_commands import section_commands

    guide = Path(__file__).resolve().parents[2] / "docs" / "DATA.md"
    text = guide.read_text(encoding="utf-8")
    for name in ("data/train.csv", "data/eval.jsonl"):
        m = re.search(rf"`/srv/rpe/{re.escape(name)}`:\n\n```\w+\n(.*?)\n```", text, re.S)
        assert m, name
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(m.group(1) + "\n", encoding="utf-8")
    volumes(tmp_path / "volumes")
    assert rpe("site", "init", "--dir", tmp_path / "site", "--site-id", "hospital-a") == 0
    capsys.readouterr()
    section = "Starting the site with these keys"
    commands = [c.replace("/srv/rpe", str(tmp_path)) for c in section_commands(guide, section)]
    assert len(commands) == 2 and all(c.startswith("rpe site start ") for c in commands)
    outs = []
    for cmd in commands:
        code = rpe(*shlex.split(cmd)[1:])
        got = capsys.readouterr()
        assert code == 0, f"{cmd}\n{got.out}{got.err}"
        outs.append(got.out)
    report, image = outs
    assert 'report-columns = "uid=Accession,prompt=Befund,target=Beurteilung"' in report
    assert "would use: 3 train, 1 eval, 0 unlabeled" in report
    assert 'task = "segmentation"' in image and 'model-path = "litemedsam"' in image and "case1.nii.gz" in image
    assert not (tmp_path / "site" / "node-config.toml").exists()
    # "a typo exits 2 naming the key meant"
    assert rpe(*shlex.split(commands[0].replace("report-group=", "report-grup="))[1:]) == 2
    assert "did you mean 'report-group'" in capsys.readouterr().err
