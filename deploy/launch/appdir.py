"""The app directory handed to ``flwr run``: a copy holding only what goes into the bundle.

``flwr run APP`` walks every file under ``APP`` before it filters them (``flwr.cli.utils.
collect_files``), ``.gitignore``d directories included: run from a checkout with its ``.venv``
inside, that is ~65,000 files and ~5 s of CPU per run. :func:`staged_app` copies just the bundle's
files (:func:`client.pin.bundle_paths`) to a temporary directory for the call; the bundle built
from it, and so its hash (a site's pin), is byte-identical. An app whose files cannot be listed so
(a malformed pyproject.toml, a fab-include matching nothing) is handed over as it is, for flwr to
report in its own words.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_app(app: Path) -> Iterator[Path]:
    """A temporary directory with ``app``'s bundle files, removed afterwards (``app`` itself when
    it is not a directory or its bundle files cannot be listed)."""
    from client.pin import bundle_paths

    app = Path(app)
    try:
        paths = bundle_paths(app) if app.is_dir() else None
    except Exception:  # noqa: BLE001 - flwr run reports the problem with the app itself
        paths = None
    if not paths:
        yield app
        return
    with tempfile.TemporaryDirectory(prefix="rpe-app-") as tmp:
        dst = Path(tmp) / app.resolve().name
        for rel in paths:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(app / rel, dst / rel)
        yield dst
