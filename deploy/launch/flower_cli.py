"""The ``flwr`` command line as functions: the operator's config.toml, ``flwr <cmd> --format json``,
registering a SuperNode key and listing the SuperNodes. (``runs.py`` submits and follows runs.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from deploy.launch.errors import LaunchError
from deploy.launch.processes import process_env
from deploy.launch.state import FEDERATION
from deploy.operator_socket import SOCKET_FILE


def write_flwr_config(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None, make_default: bool = True
) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``, keeping other entries."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = entry
    if make_default or "default" not in superlink:
        superlink["default"] = name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, path)
    return path


def write_socket_file(flwr_home: Path, sock: Path) -> Path:
    """``$FLWR_HOME/superlink-socket``: the operator socket :func:`operator_flwr` (``python -m
    deploy.flwr_main``) connects through; ``config.toml``'s address stays the TLS name."""
    path = Path(flwr_home) / SOCKET_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{Path(sock).resolve()}\n")
    os.replace(tmp, path)
    return path


def operator_flwr() -> list[str]:
    """The operator's ``flwr``: Flower's CLI through the coordinator's Unix socket (stock ``flwr``
    reaches only the Fleet API of a SuperLink started by ``deploy.launch``)."""
    return [sys.executable, "-P", "-m", "deploy.flwr_main"]  # -P: not the working directory first


#: Prepended to every ``flwr`` CLI command, e.g. ``["ip", "netns", "exec", "coord"]`` to act as an
#: operator inside another network namespace (the multi-host tests).
CLI_PREFIX: list[str] = []


def flwr_cli(args: list[str], flwr_home: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr <args> --format json``; return the parsed JSON (``flwr`` exits 0 even on failure)."""
    cmd = [*CLI_PREFIX, *operator_flwr(), *args, "--format", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=process_env(flwr_home), timeout=timeout)
    text = res.stdout.strip()
    start = text.find("{")
    try:
        out = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if not out:
        raise LaunchError(f"{' '.join(cmd)} printed no JSON (rc={res.returncode}): {res.stdout}{res.stderr}")
    return out


#: tries of one ``flwr supernode register`` that timed out
REGISTER_ATTEMPTS = 3


def register_site(flwr_home: Path, public_key: Path, site: str, federation: str = FEDERATION) -> int | None:
    """``flwr supernode register``; returns the node id, or None if the key was registered before.

    A CLI call that outlives its timeout (a whole process: 100 registrations on 2 loaded cores, issue 29)
    is tried again; if the first one did register the key, the retry answers "already in use" (None)."""
    args = ["supernode", "register", str(public_key), federation, "--name", f"site-{site}"]
    for attempt in range(REGISTER_ATTEMPTS):
        try:
            out = flwr_cli(args, flwr_home)
            break
        except subprocess.TimeoutExpired:
            if attempt == REGISTER_ATTEMPTS - 1:
                raise LaunchError(
                    f"registering site {site!r}: `flwr supernode register` did not answer in "
                    f"{REGISTER_ATTEMPTS} tries (machine overloaded?); run `register` again"
                ) from None
    if out.get("success"):
        return int(out["node-id"])
    message = str(out.get("error-message", ""))
    if "already in use" in message:
        return None
    raise LaunchError(f"registering site {site!r} failed: {message}")


def supernode_status(flwr_home: Path, federation: str = FEDERATION) -> dict[int, str]:
    """{node id: status} from ``flwr supernode ls``."""
    out = flwr_cli(["supernode", "ls", federation], flwr_home)
    if not out.get("success"):
        raise LaunchError(f"flwr supernode ls failed: {out.get('error-message')}")
    return {int(n["node-id"]): str(n["status"]) for n in out.get("nodes", [])}


def register_many(
    flwr_home: Path, public_keys: dict[str, Path], federation: str = FEDERATION, timeout: float | None = None
) -> tuple[dict[str, int | None], dict[str, str]]:
    """Register every site's key with ONE process (``python -m deploy.launch.register_keys``: one
    Control API client, one request per key) instead of a ``flwr supernode register`` process per
    site (issue 29: 100 of those took ~8 min on two loaded cores). Returns ({site: node id, or None
    if the key was registered before}, {site: why Flower refused it}): one refused key does not
    undo the others. A call that outlives ``timeout`` (default 60 s + 1 s per key) is tried again, like ``register_site``."""
    if not public_keys:
        return {}, {}
    limit = timeout if timeout is not None else 60.0 + len(public_keys)
    cmd = [
        *CLI_PREFIX,
        sys.executable,
        "-P",
        "-m",
        "deploy.launch.register_keys",
        federation,
        *(f"{site}={Path(key).resolve()}" for site, key in public_keys.items()),
    ]
    for attempt in range(REGISTER_ATTEMPTS):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=process_env(flwr_home), timeout=limit)
            break
        except subprocess.TimeoutExpired:
            if attempt == REGISTER_ATTEMPTS - 1:
                raise LaunchError(
                    f"registering {len(public_keys)} site(s) did not finish in {REGISTER_ATTEMPTS} tries of "
                    f"{limit:.0f} s (machine overloaded?); run `register` again"
                ) from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise LaunchError(
            f"registering {len(public_keys)} site(s) printed no result (rc={res.returncode}): "
            f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
        ) from None
    node_ids: dict[str, int | None] = {}
    errors: dict[str, str] = {}
    for site in public_keys:
        got = out.get(site, {"error": "no answer"})
        if "node-id" in got:
            node_ids[site] = int(got["node-id"])
        elif "already in use" in str(got.get("error", "")):
            node_ids[site] = None
        else:
            errors[site] = str(got.get("error"))
    return node_ids, errors
