"""The operator's ``flwr``: ``python -m deploy.flwr_main ARGS`` is ``flwr ARGS`` through the
coordinator's Unix socket.

Why: the SuperLink's Control API answers only on that socket (``deploy/operator_socket.py``), and
stock ``flwr`` speaks only TCP. The socket comes from ``$RPE_SUPERLINK_SOCKET`` or from the file
``$FLWR_HOME/superlink-socket`` that ``deploy.launch`` writes beside ``config.toml``; without either
this is plain ``flwr``. Whoever may not enter the socket's directory gets "Permission denied".
"""

from __future__ import annotations

import sys

from deploy.operator_socket import run_entry

if __name__ == "__main__":
    sys.exit(run_entry("flwr"))
