"""Linux network namespaces for the multi-host tests: one namespace per host, veth links, nftables.

Topology (every name carries a per-test random tag, so only our own objects are touched)::

    site-a   10.231.1.2 --veth-- 10.231.1.1 \\
    site-b   10.231.2.2 --veth-- 10.231.2.1  > coord (SuperLink on 127.0.0.1, nginx on 0.0.0.0)
    outsider 10.231.3.2 --veth-- 10.231.3.1 /

No routing between the links: each peer reaches the coordinator only at its own link address.
``Topology.remove`` deletes the namespaces (which deletes their veth ends); it runs even when a test
fails. Needs root and a kernel that allows ``ip netns add``; :func:`unavailable` says why not.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

PEERS = ("site-a", "site-b", "outsider")
SUBNET = "10.231.{n}.0/24"


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def unavailable() -> str | None:
    """None if namespaces can be made here, else the reason (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"rpe-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except OSError as exc:
        return f"the kernel refused `ip netns add`: {exc}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Topology:
    """The namespaces of one test: ``ns[host]`` is the namespace name, ``addr[host]`` the host's
    address, ``coord_addr[host]`` the coordinator's address on that host's link."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    ns: dict[str, str] = field(default_factory=dict)
    addr: dict[str, str] = field(default_factory=dict)
    coord_addr: dict[str, str] = field(default_factory=dict)
    nets: dict[str, str] = field(default_factory=dict)
    #: the peer hosts (each a link of its own to the coordinator); test_join_journey uses three sites
    peers: tuple[str, ...] = PEERS
    #: each peer's end of its link (the device a route to the coordinator's public address uses)
    links: dict[str, str] = field(default_factory=dict)

    def create(self) -> Topology:
        coord = f"rpe-{self.tag}-coord"
        self.ns["coord"] = coord
        _ip("netns", "add", coord)
        _ip("-n", coord, "link", "set", "lo", "up")
        for n, host in enumerate(self.peers, start=1):
            name = f"rpe-{self.tag}-{host}"
            self.ns[host] = name
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
            here, there = f"v{self.tag}c{n}", f"v{self.tag}p{n}"
            self.links[host] = there
            _ip("link", "add", here, "netns", coord, "type", "veth", "peer", "name", there, "netns", name)
            self.coord_addr[host], self.addr[host] = f"10.231.{n}.1", f"10.231.{n}.2"
            self.nets[host] = SUBNET.format(n=n)
            _ip("-n", coord, "addr", "add", f"{self.coord_addr[host]}/24", "dev", here)
            _ip("-n", name, "addr", "add", f"{self.addr[host]}/24", "dev", there)
            _ip("-n", coord, "link", "set", here, "up")
            _ip("-n", name, "link", "set", there, "up")
        return self

    def public_address(self, address: str = "10.231.0.1") -> str:
        """One address of the coordinator that every peer reaches over its own link, like a real
        coordinator's one public name: a /32 on the coordinator's loopback and a host route at each
        peer (sources stay the peers' link addresses, so ``--site-network`` still tells them apart)."""
        _ip("-n", self.ns["coord"], "addr", "add", f"{address}/32", "dev", "lo")
        for host in self.peers:
            _ip("-n", self.ns[host], "route", "add", f"{address}/32", "dev", self.links[host])
        return address

    def prefix(self, host: str) -> list[str]:
        """Command prefix that runs a program on ``host`` (``ip netns exec`` keeps the PID: it
        execs the program, so PR_SET_PDEATHSIG set before survives)."""
        return ["ip", "netns", "exec", self.ns[host]]

    def drop_percent(self, host: str, percent: int) -> None:
        """Drop ``percent`` % of TCP packets entering ``host`` (nftables; this kernel has no netem)."""
        nft = ["ip", "netns", "exec", self.ns[host], "nft"]
        for rule in (
            ["add", "table", "inet", "rpeloss"],
            [
                "add",
                "chain",
                "inet",
                "rpeloss",
                "in",
                "{",
                "type",
                "filter",
                "hook",
                "input",
                "priority",
                "0",
                ";",
                "}",
            ],
            [
                "add",
                "rule",
                "inet",
                "rpeloss",
                "in",
                "meta",
                "l4proto",
                "tcp",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                str(int(percent)),
                "drop",
            ],
        ):
            res = subprocess.run([*nft, *rule], capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                raise OSError(f"nft {' '.join(rule)}: {res.stderr.strip()}")

    def clear_drop(self, host: str) -> None:
        """Remove the packet-loss table of :meth:`drop_percent` (absent: nothing to do)."""
        subprocess.run(
            ["ip", "netns", "exec", self.ns[host], "nft", "delete", "table", "inet", "rpeloss"],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def remove(self) -> None:
        """Delete every namespace of this topology (their veth ends go with them)."""
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.ns.clear()
