"""What a start command checks before it starts anything, and how it tells a process's own failure.

- input files: the CA parses as an X.509 certificate, the key file exists, is readable and is a
  private key, the coordinator key is a public key, the data and model paths exist;
- ports: free before binding, else which process holds it (``/proc/net/tcp`` + ``/proc/*/fd``), and
  after start-up, that the process listening is ours (not another coordinator on the same port);
- logs: the log's own error line (Flower's ``Exit Code: 305`` block, an ``ERROR`` line, the last
  exception line) of a process that died or never connected, read from where its start began.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deploy.launch.errors import LaunchError

#: model names the sites resolve themselves (common/models.py, the segmentation family's default)
PACKAGED_MODELS = frozenset({"smollm2-135m-instruct", "litemedsam"})


def _readable(label: str, path: Path | str, what: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise LaunchError(f"{label} {path}: no such file; expected {what}")
    if not path.is_file():
        raise LaunchError(f"{label} {path}: not a file; expected {what}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LaunchError(f"{label} {path}: cannot read it ({exc.strerror}); expected {what}") from None


def check_ca_cert(path: Path | str, label: str = "--root-certificates") -> None:
    """``path`` holds a PEM X.509 certificate (the federation's ``ca.crt``)."""
    data = _readable(label, path, "the federation's CA certificate (ca.crt, PEM)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise LaunchError(f"{label} {path}: not a PEM certificate ({exc}); expected the federation's ca.crt") from None
    try:
        ca = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = True  # a v1 root: accepted, as TLS libraries do
    if not ca:
        raise LaunchError(f"{label} {path}: a certificate, but not a CA's; expected the federation's ca.crt")


def check_private_key(path: Path | str, label: str = "--auth-key") -> None:
    """``path`` holds an unencrypted private key (OpenSSH or PEM), e.g. the site's ``SITE_auth``."""
    data = _readable(label, path, "the site's SuperNode private key (SITE_auth, OpenSSH)")
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            load(data, password=None)
            return
        except (ValueError, TypeError):
            continue
        except Exception:  # noqa: BLE001 - cryptography raises UnsupportedAlgorithm and friends
            continue
    hint = " (that is the public half; pass the file without .pub)" if str(path).endswith(".pub") else ""
    raise LaunchError(f"{label} {path}: not an unencrypted private key{hint}")


def check_public_key(path: Path | str, label: str = "--coordinator-key") -> None:
    """``path`` holds a PEM public key (``coordinator.pub``)."""
    data = _readable(label, path, "the coordinator's public key (coordinator.pub, PEM)")
    try:
        serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise LaunchError(f"{label} {path}: not a PEM public key; expected coordinator.pub") from None


def check_exists(path: Path | str, label: str, what: str) -> None:
    if not str(path) or not Path(path).expanduser().exists():
        raise LaunchError(f"{label} {path or '(empty)'}: does not exist; expected {what}")


def check_model(model: str, label: str = "--model-path") -> None:
    """A packaged model name, or an existing file or directory."""
    if model in PACKAGED_MODELS:
        return
    check_exists(model, label, f"a model directory or file, or one of {sorted(PACKAGED_MODELS)}")


# --- ports -------------------------------------------------------------------------------------


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holders(port: int) -> dict[int, str]:
    """{pid: command line} of the processes this account can see listening on TCP ``port``."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        links = set()
        for fd in fds:  # one by one: an fd may close meanwhile (the listing's own, in this process)
            try:
                links.add(os.readlink(fd))
            except OSError:
                continue
        if links & inodes:
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found[int(entry.name)] = " ".join(a.decode(errors="replace") for a in argv if a)[:200]
            except OSError:
                found[int(entry.name)] = "?"
    return found


def check_port_free(host: str, port: int, label: str = "--port") -> None:
    """Bind ``host:port`` for a moment (as a server would, SO_REUSEADDR); a LaunchError naming the
    holder if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                holders = port_holders(port)
                who = "; ".join(f"pid {pid} ({cmd})" for pid, cmd in sorted(holders.items())) or "another process"
                raise LaunchError(
                    f"{label} {port}: {host}:{port} is already in use by {who}; stop it or choose another port"
                ) from None
            raise LaunchError(f"{label} {port}: cannot bind {host}:{port} ({exc.strerror})") from None


# --- logs --------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_size(path: Path | str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def log_lines(path: Path | str, offset: int = 0) -> list[str]:
    """The log's lines written since ``offset`` (ANSI colours removed)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [_ANSI.sub("", line).rstrip() for line in text.splitlines()]


def error_line(lines: list[str]) -> str:
    """The line that says why: Flower's ``Exit Code: N`` with the lines after it, else the last
    exception or ``ERROR`` line, else the last line."""
    for i in range(len(lines) - 1, -1, -1):
        m = re.search(r"Exit Code: (\d+)", lines[i])
        if m:
            tail = []
            for line in lines[i + 1 :]:
                if not line.strip() or line.startswith("For more information"):
                    break
                tail.append(line.strip())
            return f"exit code {m.group(1)}: {' '.join(tail)}".strip()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line) or line.startswith(("ERROR", "[Errno")):
            return re.sub(r"^ERROR\s*:\s*", "", line)
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "(the log is empty)"
