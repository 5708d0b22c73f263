"""The ``rpe`` command line: every command has --help, and the registry → embed → compose path works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import tiny_adapter

from common.adapters import load_peft_adapter, save_peft_adapter
from common.families.report.data import Example, write_jsonl
from deploy.cli import build_parser, main

COMMANDS = [
    [],
    ["registry"],
    ["registry", "init"],
    ["registry", "add"],
    ["registry", "ls"],
    ["registry", "show"],
    ["registry", "rm"],
    ["embed"],
    ["compose"],
    ["keygen"],
    ["audit"],
    ["audit", "verify"],
    ["audit", "report"],
    ["audit", "cross-check"],
    ["audit", "export"],
    ["audit", "check-report"],
    ["experiment"],
    ["blob-key"],
    ["blob-key", "new"],
    ["privacy"],
    ["privacy", "epsilon"],
    ["privacy", "z-norms"],
    ["privacy", "spent"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "rpe")
def test_every_command_explains_itself(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*cmd, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rpe" in out and len(out.splitlines()) > 3


def test_console_script_entry_point_is_the_composition_root():
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rpe"] == "deploy.cli:main"


def test_embed_with_minilm_writes_a_384_d_z(tmp_path, capsys):
    """Regression: ``--representation minilm`` crashed with UnboundLocalError (``mech`` set in one branch)."""
    data = tmp_path / "site.jsonl"
    write_jsonl(
        data,
        [
            Example(prompt=f"Findings: small nodule number {i}.", target=None, group="ct-head", uid=str(i))
            for i in range(3)
        ],
    )
    main(
        [
            "embed",
            "--representation",
            "minilm",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "z.npy"),
            "--quiet",
            "--json",
        ]
    )
    emb = json.loads(capsys.readouterr().out)
    assert emb["dim"] == 384 and emb["examples"] == 3 and emb["representation"] == "minilm"
    assert np.load(tmp_path / "z.npy").shape == (384,)
    with pytest.raises(SystemExit) as exit_:  # noise on a MiniLM z is refused, as before
        main(
            [
                "embed",
                "--representation",
                "minilm",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "z2.npy"),
                "--z-clip",
                "1",
                "--z-epsilon",
                "4",
            ]
        )
    assert exit_.value.code == 2 and "hidden-mean only" in capsys.readouterr().err


def test_registry_embed_compose_round_trip(tmp_path, tiny_model_dir, capsys):
    reg = tmp_path / "reg"
    main(["registry", "init", "--registry", str(reg), "--base", str(tiny_model_dir)])
    for i, site in enumerate(["a", "b", "c"]):
        peft_dir = save_peft_adapter(tiny_adapter(tiny_model_dir, i), tmp_path / f"peft-{site}")
        z = np.random.default_rng(i).normal(size=64).astype(np.float32)
        np.save(tmp_path / f"z-{site}.npy", z)
        main(
            [
                "registry",
                "add",
                "--registry",
                str(reg),
                "--adapter",
                str(peft_dir),
                "--embedding",
                str(tmp_path / f"z-{site}.npy"),
                "--site",
                site,
                "--task",
                "report-text",
                "--samples",
                "10",
            ]
        )
    capsys.readouterr()
    main(["registry", "ls", "--registry", str(reg), "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["meta"]["site"] for r in listed) == ["a", "b", "c"]

    data = tmp_path / "site.jsonl"
    write_jsonl(
        data,
        [
            Example(prompt=f"Findings: small nodule number {i}.", target=None, group="ct-head", uid=str(i))
            for i in range(3)
        ],
    )
    main(
        [
            "embed",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "zt.npy"),
            "--quiet",
            "--json",
        ]
    )
    emb = json.loads(capsys.readouterr().out)
    assert emb["dim"] == 64 and emb["examples"] == 3 and emb["tokens"] > 0

    out = tmp_path / "composed"
    main(
        [
            "compose",
            "--registry",
            str(reg),
            "--embedding",
            str(tmp_path / "zt.npy"),
            "--strategy",
            "lin-l1",
            "--k",
            "2",
            "--exclude-site",
            "a",
            "--out",
            str(out),
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert len(res["retrieved"]) == 2 and all(not r["id"].startswith("a:") for r in res["retrieved"])
    assert abs(sum(r["weight"] for r in res["retrieved"]) - 1.0) < 1e-9
    composed = load_peft_adapter(out)
    assert set(composed.modules) == set(tiny_adapter(tiny_model_dir, 0).modules)

    main(["audit", "verify", "--log", str(reg / "audit.jsonl")])
    assert "OK" in capsys.readouterr().out


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, tiny_model_dir, capsys):
    reg = tmp_path / "reg"
    main(["registry", "init", "--registry", str(reg), "--base", str(tiny_model_dir)])
    np.save(tmp_path / "z.npy", np.zeros(7, dtype=np.float32))
    with pytest.raises(SystemExit) as exit_:
        main(["compose", "--registry", str(reg), "--embedding", str(tmp_path / "z.npy"), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "rpe: error:" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "compose",
                "--registry",
                str(tmp_path / "nope"),
                "--embedding",
                str(tmp_path / "z.npy"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exit_.value.code == 2
    assert "rpe: error:" in capsys.readouterr().err


def test_compose_out_never_overwrites_a_foreign_directory(tmp_path, tiny_model_dir, capsys):
    """Issue 10 item 8: `rpe compose --out` once overwrote a source adapter; now it refuses unless --force,
    replaces only an earlier composition, and changes nothing (no audit entry) when it refuses."""
    reg = tmp_path / "reg"
    main(["registry", "init", "--registry", str(reg), "--base", str(tiny_model_dir)])
    for i, site in enumerate(["a", "b"]):
        peft_dir = save_peft_adapter(tiny_adapter(tiny_model_dir, i), tmp_path / f"peft-{site}")
        np.save(tmp_path / f"z-{site}.npy", np.random.default_rng(i).normal(size=64).astype(np.float32))
        main(
            [
                "registry",
                "add",
                "--registry",
                str(reg),
                "--adapter",
                str(peft_dir),
                "--embedding",
                str(tmp_path / f"z-{site}.npy"),
                "--site",
                site,
                "--task",
                "report-text",
                "--samples",
                "10",
            ]
        )
    z = str(tmp_path / "z-a.npy")
    source = tmp_path / "peft-a"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    audit_before = (reg / "audit.jsonl").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["compose", "--registry", str(reg), "--embedding", z, "--k", "2", "--out", str(source)])
    assert exit_.value.code == 2 and "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert (reg / "audit.jsonl").read_bytes() == audit_before
    out = tmp_path / "composed"
    for _ in range(2):  # an earlier composition is replaced whole
        main(["compose", "--registry", str(reg), "--embedding", z, "--k", "2", "--out", str(out), "--json"])
    assert load_peft_adapter(out).modules and not [p for p in tmp_path.iterdir() if p.name.startswith(".composed")]
    main(["compose", "--registry", str(reg), "--embedding", z, "--k", "2", "--out", str(source), "--force"])
    assert load_peft_adapter(source).modules


def test_forged_npy_header_and_fifo_embedding_are_clear_errors_in_bounded_time(tmp_path, tiny_model_dir, capsys):
    import io
    import os

    reg = tmp_path / "reg"
    main(["registry", "init", "--registry", str(reg), "--base", str(tiny_model_dir)])
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    forged = tmp_path / "forged.npy"
    forged.write_bytes(buf.getvalue() + b"\0" * 64)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    for bad, says in ((forged, "1099511627776 values"), (fifo, "FIFO")):
        with pytest.raises(SystemExit) as exit_:
            main(["compose", "--registry", str(reg), "--embedding", str(bad), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "rpe: error:" in err and says in err


@pytest.mark.parametrize("site", ["../../x", "a/b", "..", "_a", "a b", ""])
def test_registry_add_refuses_a_site_id_that_is_no_site_id(site, tmp_path, tiny_model_dir, capsys):
    """Issue 26 class 9: ``../../x`` passed the registry CLI. The id is checked as the allow-list checks
    it (it becomes a file name elsewhere), before the registry is opened: exit 2, a clear message,
    nothing written."""
    reg = tmp_path / "reg"
    main(["registry", "init", "--registry", str(reg), "--base", str(tiny_model_dir)])
    before = sorted((p.name, p.stat().st_size) for p in reg.rglob("*") if p.is_file())
    peft = save_peft_adapter(tiny_adapter(tiny_model_dir, 0), tmp_path / "peft")
    np.save(tmp_path / "z.npy", np.ones(64, dtype=np.float32))
    capsys.readouterr()
    argv = ["registry", "add", "--registry", str(reg), "--adapter", str(peft), "--embedding", str(tmp_path / "z.npy")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--site", site, "--task", "t", "--samples", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--site" in err and "is invalid" in err and "Traceback" not in err, err
    assert sorted((p.name, p.stat().st_size) for p in reg.rglob("*") if p.is_file()) == before
