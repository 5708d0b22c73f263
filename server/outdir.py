"""Write an output directory all at once: into a temporary sibling, then rename it into place.

``rpe compose --out DIR`` once overwrote whatever DIR held (a user lost a source adapter), and a
SIGKILL in the middle left new weights under an old config. ``output_dir`` fixes both: the new
content is written and fsynced in a temporary directory next to DIR, and only then swapped in with
renames, so a reader sees the old directory or the new one, never a mix. An existing non-empty DIR
is replaced only when it is an earlier output of the same kind (it carries our marker file) or the
caller passes ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.files.durable import fsync_dir

MARKER = ".rpe-output.json"


class OutputDirError(ValueError):
    """The output directory cannot be written without destroying something that is not ours."""


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def check_replaceable(out: Path, kind: str, force: bool = False) -> None:
    """Raise ``OutputDirError`` unless ``out`` is absent, empty, an earlier ``kind`` output, or ``force``."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a directory; choose another --out")
    if force or not any(out.iterdir()):
        return
    marker = out / MARKER
    try:
        ours = json.loads(marker.read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise OutputDirError(
            f"{out} is not empty and is not an earlier {kind} output (no {MARKER}); "
            "refusing to overwrite it — choose an empty or new directory, or pass --force"
        )


@contextmanager
def output_dir(out: str | os.PathLike[str], kind: str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``out`` atomically (then fsynced).

    On an exception nothing at ``out`` changes and the temporary directory is removed. A crash
    leaves at most a ``.<name>.tmp-*`` / ``.<name>.old-*`` sibling, never a half-written ``out``.
    """
    out = Path(out).absolute()
    check_replaceable(out, kind, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _fsync_tree(tmp)
        if out.exists():
            check_replaceable(out, kind, force)  # unchanged since we started?
            if _exchange(tmp, out):  # one atomic step: out is the new directory, tmp the old one
                fsync_dir(out.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)  # fallback: a crash here leaves the old content under .old-*
            os.replace(tmp, out)
            fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
