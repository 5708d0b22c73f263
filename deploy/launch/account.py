"""The coordinator's own account and the files only it (and its operators) may touch.

Why: the SuperLink starts every ServerApp as a child with its own uid and environment
(``RPE_REGISTRY``, ``RPE_ALLOWLIST``). Started by root, every run ran as root. ``--run-as USER``
starts the SuperLink (and so its SuperExec and ServerApps) as that unprivileged user, creating it
as a system account when the launcher is root and it does not exist; the registry becomes that
user's alone (owner, mode 0700). The operator socket's directory (``<workdir>/control``) is the
operator credential on the host: owner = the SuperLink's user, mode 0700, or 2750 with the
``--operator-group`` whose members may use ``python -m deploy.flwr_main``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.launch.errors import LaunchError


@dataclass(frozen=True)
class Account:
    """Who the coordinator's processes run as, and which group may use the operator socket."""

    name: str
    uid: int
    gid: int
    operator_gid: int | None = None

    @property
    def switches(self) -> bool:
        """True when the processes run as someone other than the launcher."""
        return self.uid != os.geteuid()


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise LaunchError(f"{' '.join(cmd)} failed (rc={res.returncode}): {res.stderr.strip()}")


def resolve_account(run_as: str | None, operator_group: str | None = None) -> Account:
    """The account for ``--run-as`` (None: the launcher's own). As root a missing user is created
    (``useradd --system``, no home, no login shell), a missing operator group (``groupadd
    --system``); as anyone else, only the launcher's own user is possible."""
    if run_as:
        try:
            entry = pwd.getpwnam(run_as)
        except KeyError:
            if os.geteuid() != 0:
                raise LaunchError(f"--run-as {run_as}: no such user, and only root can create it") from None
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            _run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    run_as,
                ]
            )
            entry = pwd.getpwnam(run_as)
        if entry.pw_uid == 0:
            raise LaunchError(f"--run-as {run_as} is uid 0: name an unprivileged account")
        if entry.pw_uid != os.geteuid() and os.geteuid() != 0:
            raise LaunchError(f"--run-as {run_as}: only root can start processes as another user")
    else:
        entry = pwd.getpwuid(os.geteuid())
    operator_gid = None
    if operator_group:
        try:
            operator_gid = grp.getgrnam(operator_group).gr_gid
        except KeyError:
            if os.geteuid() != 0:
                raise LaunchError(f"--operator-group {operator_group}: no such group") from None
            _run([shutil.which("groupadd") or "/usr/sbin/groupadd", "--system", operator_group])
            operator_gid = grp.getgrnam(operator_group).gr_gid
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, operator_gid)


def _chown(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid, follow_symlinks=False)
    elif gid != os.stat(path).st_gid:
        os.chown(path, -1, gid)  # to a group the launcher is in; PermissionError otherwise


def control_dir(workdir: Path, account: Account) -> Path:
    """``<workdir>/control``: the operator socket's directory, owner = the account, mode 0700, or
    2750 with the operator group (set-gid: the socket inherits the group)."""
    path = Path(workdir) / "control"
    path.mkdir(exist_ok=True)
    if account.operator_gid is None:
        _chown(path, account.uid, account.gid)
        path.chmod(0o700)
    else:
        _chown(path, account.uid, account.operator_gid)
        path.chmod(0o2750)
    return path


def private_dir(path: Path, account: Account) -> Path:
    """A directory only the account may use (mode 0700): its state, its FLWR_HOME."""
    path.mkdir(parents=True, exist_ok=True)
    _chown(path, account.uid, account.gid)
    path.chmod(0o700)
    return path


def give_registry(registry: Path, account: Account) -> Path:
    """The registry becomes the account's alone: every file owned by it, the directory mode 0700
    (created if missing, so the ServerApp can create the registry in it)."""
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    if account.switches:
        for root, dirs, files in os.walk(registry):
            for name in [*dirs, *files]:
                os.chown(Path(root) / name, account.uid, account.gid, follow_symlinks=False)
        os.chown(registry, account.uid, account.gid)
    registry.chmod(0o700)
    return registry


def readable_by(path: Path, account: Account) -> None:
    """A secret the account's processes must read (the SuperLink's TLS key): owned by it, 0600."""
    if account.switches:
        os.chown(path, account.uid, account.gid)
    path.chmod(0o600)


def _allowed(path: Path, uid: int, gids: set[int], bits: int) -> bool:
    """Would ``uid`` with groups ``gids`` get ``bits`` (4 r, 2 w, 1 x) on ``path`` (mode bits only)?"""
    st = os.stat(path)
    if uid == 0:
        return True
    if st.st_uid == uid:
        mode = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        mode = (st.st_mode >> 3) & 7
    else:
        mode = st.st_mode & 7
    return mode & bits == bits


def reachable(path: Path, uid: int, gids: set[int], bits: int) -> bool:
    """``path`` itself with ``bits``, every directory above it (as written and after symlinks)
    enterable, for ``uid``/``gids``. A missing path counts by its directory (it is made later)."""
    path = Path(os.path.abspath(path))
    if not path.exists():
        path, bits = path.parent, 1
    for candidate in dict.fromkeys([path, Path(os.path.realpath(path))]):
        if not all(_allowed(parent, uid, gids, 1) for parent in candidate.parents):
            return False
        if not _allowed(candidate, uid, gids, bits):
            return False
    return True


def check_reachable(account: Account, readable: list[Path], directories: list[Path]) -> None:
    """Before starting anything as ``account``: can it execute this interpreter, read each file of
    ``readable``, and enter and write each directory of ``directories``? (Mode bits, from root's
    side: the interpreter itself may be one the account cannot start.) A clear error names what it
    cannot reach (a working directory under a mode-0700 home, a virtual environment under /root)
    instead of a SuperLink that dies at start-up."""
    if not account.switches:
        return
    gids = {account.gid}
    wanted = [(Path(sys.executable), 5), *((Path(p), 4) for p in readable), *((Path(d), 7) for d in directories)]
    missing = [str(p) for p, bits in wanted if not reachable(p, account.uid, gids, bits)]
    if missing:
        raise LaunchError(
            f"the account {account.name!r} (uid {account.uid}) cannot reach {', '.join(missing)}: give it "
            "access (every directory above needs o+x), or install the virtual environment / use a --workdir "
            "and --registry where it can read them"
        )
