"""The coordinator's processes: the SuperLink (certificates, TLS, SuperNode auth), the SuperExec
it starts for ServerApps (restarted if it died), nginx in front of it, and the registration of
the sites' SuperNode keys and submission-signing keys.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.trust.signing import generate_keypair
from deploy import proxy, tls
from deploy.launch import checks
from deploy.launch.account import (
    Account,
    check_reachable,
    control_dir,
    give_registry,
    private_dir,
    reachable,
    readable_by,
    resolve_account,
)
from deploy.launch.errors import LaunchError
from deploy.launch.flower_cli import register_many, supernode_status, write_flwr_config, write_socket_file
from deploy.launch.processes import (
    cmdline,
    descendants,
    is_alive,
    proc_start_time,
    process_env,
    spawn,
    stop_process,
    wait_port,
)
from deploy.launch.state import DEFAULT_SUPERLINK_PORT, FEDERATION, SiteSpec, load_state, save_state
from deploy.operator_socket import MAX_SOCKET_PATH, SOCKET_ENV, write_wrappers
from deploy.proxy import ProxyConfigError, max_sites_from_env
from server.allowlist import AllowList


def start_superlink(
    workdir: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    tls_hosts: list[str] | None = None,
    sites: list[str] | None = None,
    registry: str | None = None,
    federation: str = FEDERATION,
    timeout: float = 60.0,
    allowlist: Path | None = None,
    proxy: bool = False,
    site_networks: list[str] | None = None,
    inner_port: int | None = None,
    operator_ca: Path | None = None,
    run_as: str | None = None,
    operator_group: str | None = None,
) -> dict[str, Any]:
    """Certificates (reused if present), the SuperLink with TLS + SuperNode auth, and config.toml.

    Its Control and Runtime APIs answer only on the Unix socket ``<workdir>/control/superlink.sock``
    (``deploy/operator_socket.py``); its TCP port serves the Fleet API alone. ``run_as``: the
    SuperLink, its SuperExec and every ServerApp run as that unprivileged user (created as a system
    user by root if missing); the registry becomes its alone. ``operator_group``: members may use
    the socket (``python -m deploy.flwr_main``); otherwise only that user and root.

    With ``proxy`` the SuperLink listens on 127.0.0.1:``inner_port`` (default ``port`` + 1000) only
    and nginx (:func:`start_proxy`) is the public ``host:port``: sites (``site_networks``) reach the
    Fleet API, only loopback or an operator-CA client certificate reaches the Control API.
    """
    workdir = Path(workdir).resolve()
    state = load_state(workdir)
    if state.get("superlink") and is_alive(state["superlink"]["pid"], state["superlink"]["start_time"]):
        raise LaunchError(f"a SuperLink from this workdir already runs (PID {state['superlink']['pid']})")
    if operator_ca is not None:
        checks.check_ca_cert(operator_ca, "--operator-ca")
    # the ports first, before anything is written: a taken port is named at once, with its holder,
    # instead of a SuperLink that dies on bind while a probe talks to whoever holds the port
    if proxy:
        checks.check_port_free(host, port, "--port (the proxy's public port)")
        checks.check_port_free("127.0.0.1", inner_port or port + 1000, "--inner-port (the SuperLink behind the proxy)")
        try:  # a bad $RPE_PROXY_MAX_SITES is refused before anything is written or started
            max_sites_from_env()
        except ProxyConfigError as exc:
            raise LaunchError(str(exc)) from None
    else:
        checks.check_port_free(host, port)
    certs = workdir / "certs"
    bundle = tls.generate(certs, list(sites or []), [h for h in [*(tls_hosts or []), host] if h != "0.0.0.0"])
    flwr_home = workdir / "flwr-home"
    account = resolve_account(run_as, operator_group)
    sock = control_dir(workdir, account) / "superlink.sock"
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise LaunchError(f"the operator socket {sock} would be longer than {MAX_SOCKET_PATH} bytes: shorter --workdir")
    bin_dir = write_wrappers(workdir / "bin")
    link_home, database, link_cwd = flwr_home, workdir / "superlink.db", workdir
    if account.switches:  # the account writes only its own directory, reads the rest
        service = private_dir(workdir / "superlink", account)
        link_home, database, link_cwd = private_dir(service / "flwr-home", account), service / "superlink.db", service
        readable_by(bundle.server_key, account)
    extra = {SOCKET_ENV: str(sock)}
    if registry:
        make_coordinator_key(registry)  # before give_registry: with --run-as the key becomes the account's too
        extra["RPE_REGISTRY"] = str(give_registry(Path(registry).resolve(), account))
    if allowlist is not None:
        extra["RPE_ALLOWLIST"] = str(Path(allowlist).resolve())
    if account.switches:
        extra["HOME"] = str(link_cwd)
        readable = [bundle.ca_cert, bundle.server_cert, bundle.server_key, bin_dir / "flwr-serverapp"]
        if "RPE_ALLOWLIST" in extra:  # read only: the operator edits it
            readable.append(Path(extra["RPE_ALLOWLIST"]))
        writable = [Path(extra["RPE_REGISTRY"])] if "RPE_REGISTRY" in extra else []
        check_reachable(account, readable, writable)
    cmd = [
        sys.executable,
        "-m",
        "deploy.superlink_main",  # flower-superlink, waiting longer for sqlite's lock
        "--ssl-ca-certfile",
        str(bundle.ca_cert),
        "--ssl-certfile",
        str(bundle.server_cert),
        "--ssl-keyfile",
        str(bundle.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(database),
    ]
    link_host, link_port = host, port
    if proxy:
        link_host, link_port = "127.0.0.1", inner_port or port + 1000
    cmd += ["--host", link_host, "--port", str(link_port)]
    env = process_env(link_home, extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"  # flower-superexec, flwr-serverapp: on the socket
    log = workdir / "logs" / "superlink.log"
    offset = checks.log_size(log)
    proc = spawn(cmd, log, env, link_cwd, account=(account.uid, account.gid))
    proc["log_offset"] = offset
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proc.update(address=f"{connect_host}:{port}", host=link_host, port=link_port, socket=str(sock))
    state.update(
        superlink=proc,
        flwr_home=str(flwr_home),
        certs=str(certs),
        federation=federation,
        ca_cert=str(bundle.ca_cert),
        proxy=None,
        run_as=account.name if account.switches else None,
        account=[account.uid, account.gid],
        socket=str(sock),
    )
    save_state(workdir, state)
    try:
        wait_port("127.0.0.1" if link_host in ("0.0.0.0", "::") else link_host, link_port, timeout, proc, offset)
        _wait_socket(sock, timeout, proc)
        if proxy:
            state["proxy"] = start_proxy(
                workdir, host, port, link_port, bundle, site_networks, operator_ca, sock=sock, account=account
            )
            save_state(workdir, state)
        write_flwr_config(flwr_home, federation, proc["address"], bundle.ca_cert)
        write_socket_file(flwr_home, sock)
        deadline = time.monotonic() + timeout
        while True:  # the port opens before the Control API answers
            try:
                supernode_status(flwr_home, federation)
                break
            except LaunchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        state["superexec_argv"] = _superexec_argv(proc["pid"], timeout=15.0)
        save_state(workdir, state)
    except BaseException:
        if state.get("proxy"):
            stop_process(state["proxy"]["pid"], state["proxy"]["start_time"])
        stop_process(proc["pid"], proc["start_time"])
        raise
    return state


def _wait_socket(sock: Path, timeout: float, proc: dict[str, Any]) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if not is_alive(proc["pid"], proc["start_time"]):
            why = checks.error_line(checks.log_lines(proc["log"], proc.get("log_offset", 0)))
            raise LaunchError(f"the SuperLink exited during start-up: {why} (log: {proc['log']})")
        if time.monotonic() > deadline:
            raise LaunchError(f"the SuperLink made no operator socket {sock} in {timeout:.0f} s; see {proc['log']}")
        time.sleep(0.1)


def live_superexec(superlink_pid: int) -> bool:
    """A live ``flower-superexec`` serving this SuperLink: its child, or one ``ensure_superexec``
    restarted (not a child, but watching the same ``--parent-pid``)."""
    if any(any(a.endswith("flower-superexec") for a in cmdline(pid)) for pid, _ in descendants(superlink_pid)):
        return True
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_start_time(int(entry.name)) is not None:
            argv = cmdline(int(entry.name))
            if (
                any(a.endswith("flower-superexec") for a in argv)
                and "--parent-pid" in argv
                and argv[argv.index("--parent-pid") + 1 :][:1] == [str(superlink_pid)]
            ):
                return True
    return False


def _superexec_argv(superlink_pid: int, timeout: float) -> list[str]:
    """The command line of the SuperExec the SuperLink started for its ServerApps ([] if none showed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, _ in descendants(superlink_pid):
            argv = cmdline(pid)
            if any(a.endswith("flower-superexec") for a in argv):
                return argv
        time.sleep(0.2)
    return []


def ensure_superexec(workdir: Path) -> bool:
    """Restart the SuperLink's SuperExec if it died; True if it was restarted.

    Why: in flwr 1.41 the SuperExec that launches ServerApps has no error handling around its
    ``AcquireTask`` poll; one HTTP 500 from the SuperLink (sqlite "database is locked" under load,
    seen in the main job with 10 SuperNodes on 2 cores) kills it, the SuperLink never starts it
    again, and every later run stays ``pending`` forever. The restarted one has the same command
    line (its ``--parent-pid`` is the SuperLink's, so it still dies with it)."""
    state = load_state(workdir)
    link, argv = state.get("superlink"), state.get("superexec_argv")
    if not link or not argv or not is_alive(link["pid"], link["start_time"]) or live_superexec(link["pid"]):
        return False
    log_path = Path(workdir) / "logs" / "superexec-restarted.log"
    try:  # the SuperLink's own environment (e.g. $RPE_ALLOWLIST, $RPE_REGISTRY): what the first one inherited
        raw = Path(f"/proc/{link['pid']}/environ").read_bytes()
        env = dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    except OSError:
        env = process_env(Path(state["flwr_home"]))
    uid, gid = state.get("account") or (os.geteuid(), os.getegid())
    creds: dict[str, Any] = {}
    if (uid, gid) != (os.geteuid(), os.getegid()):  # as the SuperLink's own account, like the first one
        creds = {"user": uid, "group": gid, "extra_groups": []}
    with open(log_path, "ab") as log:
        subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=link.get("cwd") or workdir,
            **creds,
        )
    print(
        f"[launch] the SuperLink's SuperExec had exited (flwr 1.41 dies on one HTTP 500 from the SuperLink); "
        f"restarted it (log: {log_path})",
        file=sys.stderr,
        flush=True,
    )
    return True


def nginx_binary() -> str:
    """Debian's nginx (``apt-get install nginx``); its default site config is never used."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise LaunchError("the reverse proxy needs nginx: apt-get install nginx (or pass --no-proxy on one machine)")
    return found


def start_proxy(
    workdir: Path,
    listen_host: str,
    listen_port: int,
    upstream_port: int,
    bundle: tls.TlsBundle,
    site_networks: list[str] | None = None,
    operator_ca: Path | None = None,
    timeout: float = 30.0,
    sock: Path | None = None,
    account: Account | None = None,
) -> dict[str, Any]:
    """nginx in front of the SuperLink (see deploy/proxy.py for what it forwards from where),
    with its own prefix directory ``<workdir>/proxy`` and config, started and stopped by PID.
    The Control API (operator certificate only) goes to the SuperLink's socket ``sock``: nginx's
    workers then run as the SuperLink's account (never as nobody, which any local user can be)."""
    worker = None
    if os.geteuid() == 0 and sock is not None and account is not None:
        if account.uid == 0:  # a root SuperLink: the workers get a system user of their own
            worker = resolve_account(PROXY_USER, None)
            worker = Account(worker.name, worker.uid, account.operator_gid or worker.gid)
            _let_group_in(sock.parent, worker.gid)
        else:
            worker = Account(account.name, account.uid, account.operator_gid or account.gid)
    if worker is not None and sock is not None and not reachable(sock, worker.uid, {worker.gid}, 6):
        raise LaunchError(
            f"nginx's workers ({worker.name}) cannot reach the operator socket {sock}: every directory "
            "above the --workdir needs o+x (e.g. not under a mode-0700 home or pytest's temporary root)"
        )
    spec = proxy.ProxySpec(
        Path(workdir) / "proxy",
        listen_host,
        listen_port,
        upstream_port,
        bundle.server_cert,
        bundle.server_key,
        bundle.ca_cert,
        list(site_networks or []),
        operator_ca,
        control_socket=sock,
        worker_user=worker.name if worker else None,
        worker_group=grp.getgrgid(worker.gid).gr_name if worker else None,
    )
    checks.check_port_free(listen_host, listen_port, "--port (the proxy's public port)")
    conf = proxy.write_config(spec)
    prefix = str(spec.prefix.resolve())
    check = subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", prefix, "-c", str(conf), "-e", f"{prefix}/logs/error.log"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check.returncode != 0:
        raise LaunchError(f"nginx rejected {conf}: {check.stderr.strip()}")
    cmd = [nginx_binary(), "-p", prefix, "-c", str(conf), "-e", f"{prefix}/logs/error.log"]
    error_log = spec.prefix / "logs" / "error.log"
    offset = checks.log_size(error_log)
    proc = spawn(cmd, Path(workdir) / "logs" / "proxy.log", dict(os.environ), Path(workdir))
    proc["log_offset"] = offset
    connect_host = "127.0.0.1" if listen_host in ("0.0.0.0", "::") else listen_host
    proc.update(
        host=listen_host,
        port=listen_port,
        upstream_port=upstream_port,
        config=str(conf),
        site_networks=spec.site_networks,
        operator_ca=str(operator_ca) if operator_ca else None,
    )
    try:
        wait_port(connect_host, listen_port, timeout, proc)
    except LaunchError as exc:
        stop_process(proc["pid"], proc["start_time"])
        why = checks.error_line(checks.log_lines(error_log, offset))  # nginx writes its errors there
        raise LaunchError(f"{exc}; nginx's error log says: {why}") from None
    except BaseException:
        stop_process(proc["pid"], proc["start_time"])
        raise
    return proc


#: nginx's workers, when the SuperLink itself runs as root (no --run-as): never ``nobody``
PROXY_USER = "rpe-proxy"


def _let_group_in(directory: Path, gid: int) -> None:
    """A root SuperLink's socket directory: group ``gid`` (nginx's workers) may enter, nobody else."""
    os.chown(directory, 0, gid)
    directory.chmod(0o2750)
    sock = directory / "superlink.sock"
    if sock.exists():
        os.chown(sock, 0, gid)


def register_sites(workdir: Path, public_keys: dict[str, Path], record: Path | None = None) -> dict[str, int | None]:
    """Register each site's public key with the SuperLink of this workdir (all of them with one
    process: ``flower_cli.register_many``; a refused key is named, the others are registered). With ``record`` (the coordinator's allow-list
    file), the keys are also written to the coordinator's own record of site -> SuperNode key
    beside it (``server.allowlist.NodeKeys``), which discovery binds every site id to."""
    if record is not None:
        node_keys = AllowList(record).node_keys
        for site, key in public_keys.items():
            node_keys.add(tls.check_site_id(site), Path(key).read_text(), replace=True)
    state = load_state(workdir)
    flwr_home = Path(state["flwr_home"])
    federation = state.get("federation", FEDERATION)
    # one process and one Control API client for every key (issue 29: a `flwr supernode register`
    # process per site, 8 at a time, took ~8 min for 100 sites on two loaded cores)
    node_ids, errors = register_many(flwr_home, {site: Path(key) for site, key in public_keys.items()}, federation)
    known = state.setdefault("registered", {})
    for site, node_id in node_ids.items():
        if node_id is not None:
            known[site] = node_id
    save_state(workdir, state)
    if errors:
        raise LaunchError("; ".join(f"registering site {site!r} failed: {why}" for site, why in errors.items()))
    return {site: known.get(site) for site in public_keys}


def signing_keys(workdir: Path, sites: list[SiteSpec]) -> Path:
    """Each site's Ed25519 submission key in ``<site-dir>/keys/`` (kept if present) and the
    coordinator's allow-list ``<workdir>/allowlist.json`` of their public keys."""
    allow = AllowList(Path(workdir) / "allowlist.json")
    for spec in sites:
        keys = Path(spec.site_dir) / "keys"
        if not (keys / f"{spec.site}.key").exists():
            generate_keypair(keys, spec.site)
        allow.add(spec.site, (keys / f"{spec.site}.pub").read_text())
    return allow.path


def coordinator_public_key(registry: str | os.PathLike[str]) -> Path:
    """The public key file the sites pin as ``coordinator-key``: ``<registry>/coordinator.pub``
    (made up front by :func:`make_coordinator_key` when the SuperLink starts with a registry; a site
    reads the file when a delivery arrives). On another machine, copy it to the site."""
    from server.coordkey import public_key_path  # lazy: server.coordkey imports the registry (and torch)

    return public_key_path(Path(registry).resolve())


def make_coordinator_key(registry: str | os.PathLike[str]) -> Path:
    """The coordinator's signing key pair in ``registry`` (``coordinator.key`` 0600 and
    ``coordinator.pub``), made now if missing, as ``rpe coordinator init`` makes it: the same
    ``server.registry.coordkey.ensure_key`` the registry's own open runs, so the ServerApp later
    creates the registry around it and signs with it. An existing key is never replaced (sites pin
    it). Returns the public key file the sites pin."""
    from server.registry import coordkey  # lazy: the registry package imports torch

    root = Path(registry).resolve()
    priv, pub = coordkey.key_paths(root)
    if priv.exists() != pub.exists():
        have, lost = (priv, pub) if priv.exists() else (pub, priv)
        raise LaunchError(
            f"registry {root} holds {have.name} but not {lost.name}: restore {lost.name} from a backup; a new "
            "key pair is not made over one half of the old (every site pins coordinator.pub)"
        )
    try:
        coordkey.ensure_key(root)
    except OSError as exc:
        raise LaunchError(f"--registry {root}: cannot make the coordinator key there ({exc})") from None
    return pub
