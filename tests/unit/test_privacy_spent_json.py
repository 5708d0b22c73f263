"""``rpe privacy spent --json`` is strict JSON and says ε = ∞ the way ``rpe site status --json`` does.

It printed ``"epsilon": null`` for a site with a release without differential privacy: a reader
could not tell "unbounded" from "nothing spent / unknown", and ``rpe site status --json`` over the
same egress log said ``"inf"``. Now both print the string ``"inf"``; a finite total stays a number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.egress import EgressLog
from common.privacy import ZMechanism, composed_epsilon, release_record
from deploy.cli import main


def _strict(text: str) -> dict:
    """JSON that a strict parser accepts (no NaN / Infinity literals)."""

    def refuse(name: str) -> None:
        raise AssertionError(f"non-JSON constant {name} in the output")

    return json.loads(text, parse_constant=refuse)


def _rpe(capsys, *argv: str) -> dict:
    capsys.readouterr()
    main(list(argv))
    return _strict(capsys.readouterr().out)


def _site(tmp_path: Path, private_only: bool) -> Path:
    """A site folder whose egress log holds a private z query and (unless ``private_only``) one
    z query sent without the Gaussian mechanism (not private: ε unbounded)."""
    site = tmp_path / ("private" if private_only else "mixed")
    log = EgressLog(site / "egress.jsonl", full_records=("meta",))
    priv = release_record(None, ZMechanism(clip=10.0, noise_multiplier=2.0), False)
    log.record(
        "query.embed",
        {"embedding": {"z": np.ones(4, np.float32)}, "meta": {"site": "a", "privacy": json.dumps(priv)}},
        run_id="1",
        extra={"outcome": "ok"},
    )
    if not private_only:
        log.record(
            "query.embed",
            {"embedding": {"z": np.ones(4, np.float32)}, "meta": {"site": "a", "privacy": json.dumps({})}},
            run_id="2",
            extra={"outcome": "ok"},
        )
    return site


def test_unbounded_epsilon_is_inf_in_both_commands(tmp_path, capsys):
    site = _site(tmp_path, private_only=False)
    spent = _rpe(capsys, "privacy", "spent", "--egress", str(site / "egress.jsonl"), "--json")
    assert spent["epsilon"] == "inf"  # was null
    assert len(spent["non_private"]) == 1 and len(spent["releases"]) == 2
    assert [r["epsilon"] for r in spent["releases"]][1] is None  # that one release: not private
    status = _rpe(capsys, "site", "status", "--site-dir", str(site), "--json")
    assert status["epsilon"] == spent["epsilon"] == "inf"


def test_finite_epsilon_stays_a_number(tmp_path, capsys):
    site = _site(tmp_path, private_only=True)
    spent = _rpe(capsys, "privacy", "spent", "--egress", str(site / "egress.jsonl"), "--json")
    assert spent["epsilon"] == pytest.approx(composed_epsilon([(2.0, 1.0, 1)], 1e-5))
    assert spent["non_private"] == []
    status = _rpe(capsys, "site", "status", "--site-dir", str(site), "--json")
    assert status["epsilon"] == pytest.approx(spent["epsilon"])


def test_help_says_how_infinity_is_printed(capsys):
    with pytest.raises(SystemExit):
        main(["privacy", "spent", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert '"inf"' in text and "unbounded" in text
