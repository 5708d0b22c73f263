"""Register many SuperNode keys with ONE process and one Control API connection (issue 29).

``flwr supernode register`` is a whole process per key: start Python, import Flower, read the
config, open a TLS connection, one request. At 100 sites on two loaded cores that was about 8
minutes, CPU-bound however many ran in parallel. Here one process (run through the operator socket
exactly like ``python -m deploy.flwr_main``) loads every key with Flower's own checks
(``flwr.cli.supernode.register.try_load_public_key``), sends one ``RegisterNode`` per key over one
client, and prints one JSON object: ``{site: {"node-id": int} | {"error": message}}``.

    python -m deploy.launch.register_keys FEDERATION SITE=PUBLIC_KEY_FILE ...

``deploy.launch.register_sites`` runs it (``FLWR_HOME`` and the socket as for ``flwr``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def register_all(federation: str, keys: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Register each key (site -> public key file); per site the node id or Flower's error message."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

    from deploy.operator_socket import route_to_socket, socket_path

    path = socket_path()
    if path:
        route_to_socket(path)
    out: dict[str, dict[str, Any]] = {}
    client = init_http_client_from_connection(read_superlink_connection(federation))
    try:
        for site, key in keys.items():
            try:
                public_key = try_load_public_key(Path(key).expanduser())
                with flwr_cli_exc_handler():
                    resp = client.RegisterNode(request=RegisterNodeRequest(public_key=public_key, name=f"site-{site}"))
                out[site] = {"node-id": int(resp.node_id)} if resp.node_id else {"error": "not registered"}
            except click.ClickException as exc:
                out[site] = {"error": exc.message}
            except SystemExit as exc:  # flwr_exit: e.g. a key that is not a NIST EC public key
                out[site] = {"error": f"public key {key} was refused by Flower (exit {exc.code})"}
    finally:
        client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or any("=" not in a for a in args[1:]):
        print("usage: python -m deploy.launch.register_keys FEDERATION SITE=PUBLIC_KEY_FILE ...", file=sys.stderr)
        return 2
    keys = {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in args[1:]}
    print(json.dumps(register_all(args[0], keys)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
