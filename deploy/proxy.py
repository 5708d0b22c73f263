"""nginx configuration for the TLS-terminating reverse proxy in front of the SuperLink.

Why: in Flower 1.41 the SuperLink serves the Fleet API (what SuperNodes need), the Control API
(``flwr run``, ``flwr supernode register``: whoever reaches it runs code on the coordinator and at
every site) and the Runtime API (the coordinator's own ServerApp / SuperExec processes) as HTTPS on
**one** port, and the OSS Control API has no authentication. So the SuperLink listens on loopback
only, and nginx (Debian's, started by PID with a private prefix directory, no global config) is the
one public port. It forwards:

- the Fleet routes (:data:`FLEET_ROUTES`, exact paths, taken from ``flwr/superlink/routers/fleet``)
  only from the site networks (``--site-network`` CIDRs; loopback always);
- ``/v1/control/*`` only from a client that presents a certificate issued by the operator CA
  (``ssl_verify_client optional``; ``python -m deploy.tls --out DIR --operator NAME`` issues both),
  to the SuperLink's operator socket (``deploy/operator_socket.py``). Loopback is **not** enough:
  every local user of the coordinator host has loopback. Operators on the host use the socket
  directly (``python -m deploy.flwr_main``); nginx's workers run as the SuperLink's account (or
  ``rpe-proxy``), never as ``nobody``, since they can reach that socket;
- nothing else: ``/v1/runtime/*`` (ServerApp/SuperExec), ``/docs``, ``/openapi.json`` answer 404,
  and a request target with ``%``, ``..``, ``//`` or a query string answers 400 before any matching,
  so no encoding trick can make nginx and the SuperLink disagree about the path.

``render_config`` only writes text; :func:`deploy.launch.start_proxy` runs nginx.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

#: Fleet API routes of flwr 1.41 (``flwr/superlink/routers/fleet/router.py``, prefix ``/v1/fleet``).
#: ``register-node`` / ``unregister-node`` are refused by the SuperLink itself under
#: ``--enable-supernode-auth`` (``fleet_handlers.register_node``); the rest need a registered key.
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
RUNTIME_PREFIX = "/v1/runtime/"
LOOPBACK = ("127.0.0.1", "::1")


#: sites one proxy is sized for by default (issue 29: one coordinator measured up to 50 on 2 cores)
DEFAULT_MAX_SITES = 250
#: connections nginx holds per site at most: the SuperNode's keep-alive connection and its heartbeat
#: connection, each with an upstream connection to the SuperLink while a request is in flight
#: (one upstream connection per request: no upstream keepalive, see ``render_config``)
CONNECTIONS_PER_SITE = 4
#: connections kept for operators, health checks and connections still closing
SPARE_CONNECTIONS = 128


#: environment variable an operator sets to size the proxy for more (or fewer) sites
MAX_SITES_ENV = "RPE_PROXY_MAX_SITES"


def max_sites_from_env() -> int:
    """``$RPE_PROXY_MAX_SITES`` (a positive whole number of sites), else :data:`DEFAULT_MAX_SITES`."""
    raw = os.environ.get(MAX_SITES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_SITES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ProxyConfigError(
            f"${MAX_SITES_ENV}={raw!r} is not a positive whole number of sites; set it to how many sites the "
            f"proxy must hold (e.g. 400), or unset it for {DEFAULT_MAX_SITES}"
        )
    return value


def worker_connections(max_sites: int) -> int:
    """nginx's ``worker_connections`` (one worker) for ``max_sites`` sites: never below nginx's
    own default of 512. nginx refuses new connections beyond it ("worker_connections are not
    enough"), which a SuperNode sees as a failed request."""
    return max(512, CONNECTIONS_PER_SITE * max_sites + SPARE_CONNECTIONS)


def open_files_limit(connections: int) -> int:
    """``worker_rlimit_nofile``: two descriptors per connection (a proxied request holds the
    client's and the upstream's) plus logs, within the hard limit this process may raise to."""
    import resource

    want = 2 * connections + 64
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return want if hard == resource.RLIM_INFINITY else min(want, int(hard))


class ProxyConfigError(ValueError):
    """An invalid proxy setting (e.g. a site network that is not a CIDR)."""


@dataclass
class ProxySpec:
    """Where nginx listens, where the SuperLink is, and who may use which API."""

    prefix: Path
    listen_host: str
    listen_port: int
    upstream_port: int
    server_cert: Path
    server_key: Path
    upstream_ca: Path
    site_networks: list[str] = field(default_factory=list)
    operator_ca: Path | None = None
    upstream_name: str = "localhost"
    #: the SuperLink's operator socket: where verified operator requests to the Control API go
    control_socket: Path | None = None
    #: nginx ``user`` directive (only when nginx starts as root): who its workers run as
    worker_user: str | None = None
    worker_group: str | None = None
    #: how many sites nginx's connection limits are sized for (``worker_connections``);
    #: default ``$RPE_PROXY_MAX_SITES``, else :data:`DEFAULT_MAX_SITES`
    max_sites: int = field(default_factory=max_sites_from_env)


def check_networks(networks: list[str]) -> list[str]:
    """Normalise CIDRs (``10.231.1.0/24``); an empty list means "any address may use the Fleet API"."""
    out = []
    for net in networks:
        try:
            out.append(str(ipaddress.ip_network(net.strip(), strict=False)))
        except ValueError:
            raise ProxyConfigError(f"--site-network {net!r} is not a network such as 10.0.1.0/24") from None
    return out


def render_config(spec: ProxySpec) -> str:
    """The whole nginx.conf (all paths absolute, inside ``spec.prefix``)."""
    pre = Path(spec.prefix).resolve()
    nets = check_networks(spec.site_networks)
    if isinstance(spec.max_sites, bool) or not isinstance(spec.max_sites, int) or spec.max_sites < 1:
        raise ProxyConfigError(f"max_sites must be a positive number of sites; got {spec.max_sites!r}")
    conns = worker_connections(spec.max_sites)
    # one upstream connection per request, on purpose: an upstream keepalive pool (tried for issue 29)
    # saved no measurable SuperLink CPU and, at 50 sites on 2 loaded cores, nginx reused connections
    # the SuperLink was closing: HTTP 502 on pull-messages (benchmarks/FEDERATION_SCALE.md)
    up = f"https://127.0.0.1:{spec.upstream_port}"
    geo = ["    default 0;" if nets else "    default 1;"]
    geo += [f"    {a}/{32 if ':' not in a else 128} 1;" for a in LOOPBACK]
    geo += [f"    {n} 1;" for n in nets]
    listen = f"[{spec.listen_host}]" if ":" in spec.listen_host else spec.listen_host
    client_ca = ""
    if spec.operator_ca is not None:
        client_ca = (
            f"        ssl_client_certificate {Path(spec.operator_ca).resolve()};\n"
            "        ssl_verify_client optional;\n        ssl_verify_depth 2;\n"
        )
    common = (
        f"            proxy_pass {up};\n"
        "            proxy_buffering off;\n            proxy_request_buffering off;\n"
        "            proxy_read_timeout 3600s;\n            proxy_send_timeout 3600s;\n"
    )
    control_up = f"https://unix:{Path(spec.control_socket).resolve()}:" if spec.control_socket else up
    control = common.replace(f"proxy_pass {up};", f"proxy_pass {control_up};")
    fleet = "".join(
        f"        location = {FLEET_PREFIX}{r} {{\n            if ($rpe_site_net = 0) {{ return 403; }}\n{common}"
        "        }\n"
        for r in FLEET_ROUTES
    )
    tmp = pre / "tmp"
    user = f"user {spec.worker_user} {spec.worker_group or spec.worker_user};\n" if spec.worker_user else ""
    return f"""# generated by deploy/proxy.py - do not edit; regenerated at every start
{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {open_files_limit(conns)};
pid {pre}/nginx.pid;
error_log {pre}/logs/error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log {pre}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 1g;
    server_tokens off;
    geo $rpe_site_net {{
{chr(10).join(geo)}
    }}
    map $ssl_client_verify $rpe_control_ok {{
        SUCCESS 1;
        default 0;
    }}
    server {{
        listen {listen}:{spec.listen_port} ssl;
        ssl_certificate {Path(spec.server_cert).resolve()};
        ssl_certificate_key {Path(spec.server_key).resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
{client_ca}        proxy_http_version 1.1;
        proxy_ssl_trusted_certificate {Path(spec.upstream_ca).resolve()};
        proxy_ssl_verify on;
        proxy_ssl_name {spec.upstream_name};
        proxy_ssl_server_name on;
        proxy_set_header Host $host;
        if ($request_uri ~ "[%?]|\\.\\.|//") {{ return 400; }}
{fleet}        location {CONTROL_PREFIX} {{
            if ($rpe_control_ok = 0) {{ return 403; }}
{control}        }}
        location = /health {{
{common}        }}
        location / {{ return 404; }}
    }}
}}
"""


def write_config(spec: ProxySpec) -> Path:
    """Create the prefix directory (logs/, tmp/) and write ``nginx.conf`` there (mode 0600)."""
    pre = Path(spec.prefix).resolve()
    for sub in ("logs", "tmp"):
        (pre / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # nginx's workers drop to their user: they need only their temp directory
        worker = pwd.getpwnam(spec.worker_user or "nobody")
        os.chown(pre / "tmp", worker.pw_uid, worker.pw_gid)
    path = pre / "nginx.conf"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_config(spec))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
