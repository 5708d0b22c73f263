"""``rpe fed run``: run-config values that must be one of a list are checked before any run is
submitted (H2 item 4), as unknown keys are: exit 2, one ``rpe: error:`` line naming the key, the
value, its closest match and the allowed values, nothing submitted. ``strategy`` and each name in
``eval-strategies`` (``server/strategies.py``), ``chroma`` (embedded, off or HOST:PORT: the ServerApp
took any other text as embedded), ``update-norm`` and ``far-ratio``. The ServerApp's own parse
(``Settings.from_run_config``, for a run submitted with ``flwr run``) refuses a bad strategy too,
before any site is asked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import rpe_run

from common.cli_base import CliError
from deploy import fed
from server.settings import Settings, SettingsError
from server.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]
ALLOWED = "expected one of: " + ", ".join(STRATEGIES)


@pytest.mark.parametrize(
    "item, words",
    [
        ("strategy=simm", ["strategy='simm' is not a known weighting strategy", "did you mean 'sim'?", ALLOWED]),
        ("strategy=lin-l2", ["strategy='lin-l2'", "did you mean 'lin-l1'?", ALLOWED]),
        ("strategy=cosine", ["strategy='cosine'", ALLOWED]),
        ("strategy=", ["strategy=''", ALLOWED]),
        ("eval-strategies=sim,lni", ["eval-strategies='lni'", "did you mean 'lin'?", ALLOWED]),
        ("eval-strategies=sim;lin", ["eval-strategies='sim;lin'", ALLOWED]),
        ("chroma=of", ["chroma='of' is not a Chroma setting", "did you mean 'off'?", "HOST:PORT"]),
        ("chroma=localhost", ["chroma='localhost'", "embedded, off, or HOST:PORT"]),
        ("chroma=127.0.0.1:port", ["chroma='127.0.0.1:port'"]),
        ("chroma=127.0.0.1:70000", ["chroma='127.0.0.1:70000'"]),
        ("update-norm=l2", ["update-norm='l2'", "expected one of: none, frobenius"]),
        ("far-ratio=-1", ["far-ratio must be a finite number >= 0"]),
    ],
)
def test_a_value_outside_its_list_is_named_with_its_match(item, words):
    for mode in ("compose", "evaluate"):
        with pytest.raises(CliError) as err:
            fed.run_config(mode, ["target=c", item], REPO)
        for word in words:
            assert word in str(err.value), (word, str(err.value))


def test_good_values_pass_and_are_spelled_as_the_serverapp_reads_them():
    cfg = fed.run_config(
        "evaluate",
        ["strategy=lin_l1", "eval-strategies= sim, lin_l1 ,avg", "chroma=127.0.0.1:8000", "update-norm=Frobenius"],
        REPO,
    )
    assert cfg["strategy"] == "lin-l1" and cfg["eval-strategies"] == "sim,lin-l1,avg"
    assert cfg["chroma"] == "127.0.0.1:8000" and cfg["update-norm"] == "frobenius"
    for name in STRATEGIES:
        assert fed.run_config("compose", [f"strategy={name}"], REPO)["strategy"] == name
    for chroma in ("embedded", "off", "chroma.internal:8000"):
        assert fed.run_config("compose", [f"chroma={chroma}"], REPO)["chroma"] == chroma
    # the pyproject's own defaults pass their own checks
    defaults = fed.app_config(REPO)
    items = [f"{k}={defaults[k]}" for k in ("strategy", "eval-strategies", "chroma", "update-norm")]
    assert fed.run_config("compose", items, REPO)


def test_the_command_line_exits_2_before_anything_is_submitted(capsys, tmp_path, monkeypatch):
    """No coordinator exists here: the value is refused before the coordinator is even looked for."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "nowhere"))
    for args, word in (
        (["compose", "target=c", "strategy=simm"], "did you mean 'sim'?"),
        (["evaluate", "eval-strategies=sim,nearst"], "did you mean 'nearest'?"),
        (["enroll", "chroma=of"], "did you mean 'off'?"),
    ):
        code, out, err = rpe_run(capsys, "fed", "run", *args)
        assert code == 2, (args, out, err)
        assert err.count("\n") == 1 and err.startswith("rpe: error:") and word in err, err
        assert "config.toml" not in err  # refused before the coordinator was looked for
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    "rc, word",
    [
        ({"strategy": "simm"}, "strategy='simm'"),
        ({"eval-strategies": "sim,lni"}, "eval-strategies='lni'"),
    ],
)
def test_the_serverapp_refuses_a_bad_strategy_before_any_site_is_asked(rc, word):
    with pytest.raises(SettingsError, match=f"{word}; {ALLOWED}"):
        Settings.from_run_config({"registry-dir": "/x", "mode": "compose", **rc})
    assert Settings.from_run_config({"registry-dir": "/x", "strategy": "lin_l1"}).strategy == "lin_l1"
