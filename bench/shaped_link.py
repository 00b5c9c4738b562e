"""A real, shaped network link to the decode service: a network namespace, a veth pair, `tc tbf`.

    with ShapedLink(rate_mbps=100) as link:
        # run the decode service under link.prefix, listening on link.decode_host
        ...

The decode service runs inside its own namespace; everything the others send it (the
prefill's KV above all) crosses the veth pair, whose both ends are shaped by a token-bucket
filter at `rate_mbps`: the kernel really holds the bytes back, as a 100 Mbit/s WiFi or a
1 Gbit/s Ethernet link between Jetsons would. `netem` (delay, loss) is not in this kernel:
add latency with `edgellm.linkproxy` in front of the decode address.

Safety: the namespace's /30 lives inside a test /24 for which the host namespace gets an
`unreachable` route while the link exists, so a packet for any other address of the test
subnet is refused on this machine instead of following the default route out of it.

Needs root and iproute2 (`ip`, `tc`); `available()` says whether this machine has them. The
KV sender's token bucket (`--kv-link-mbps`) is the portable stand-in where it has not.
"""

from __future__ import annotations

import os
import shutil
import subprocess

SUBNET_PREFIX = "10.213"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def available() -> bool:
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        return False
    probe = f"edgellm-probe-{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError):
        return False
    _run("ip", "netns", "del", probe)
    return True


class ShapedLink:
    def __init__(self, rate_mbps: float, index: int | None = None) -> None:
        n = (os.getpid() % 200 if index is None else index) + 1
        self.rate_mbps = rate_mbps
        self.netns = f"edgellm-link-{os.getpid()}-{n}"
        self.host_if, self.ns_if = f"elh{os.getpid() % 10000}n{n}", f"eld{os.getpid() % 10000}n{n}"
        self.subnet = f"{SUBNET_PREFIX}.{n}.0/24"
        self.host_ip, self.decode_host = f"{SUBNET_PREFIX}.{n}.1", f"{SUBNET_PREFIX}.{n}.2"

    @property
    def prefix(self) -> list[str]:
        """Run a command inside the link's namespace."""
        return ["ip", "netns", "exec", self.netns]

    def _tbf(self, device: str, *netns: str) -> None:
        rate_bytes = self.rate_mbps * 1e6 / 8
        burst = max(32 * 1024, int(rate_bytes / 100))  # 10 ms of traffic, at least a few full-size packets
        _run(*netns, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{self.rate_mbps:g}mbit",
             "burst", str(burst), "latency", "200ms")

    def __enter__(self) -> ShapedLink:
        ns = ("ip", "netns", "exec", self.netns)
        try:
            _run("ip", "route", "add", "unreachable", self.subnet)
            _run("ip", "netns", "add", self.netns)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.netns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run(*ns, "ip", "addr", "add", f"{self.decode_host}/30", "dev", self.ns_if)
            _run(*ns, "ip", "link", "set", self.ns_if, "up")
            _run(*ns, "ip", "link", "set", "lo", "up")
            self._tbf(self.host_if)  # towards decode: the KV
            self._tbf(self.ns_if, *ns)  # back: acknowledgements and tokens
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self) -> None:
        """Pull the cable: the decode side's interface goes down; packets are dropped, nothing is reset."""
        _run(*self.prefix, "ip", "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        _run(*self.prefix, "ip", "link", "set", self.ns_if, "up")

    def __exit__(self, *exc: object) -> None:
        # Deleting one end deletes the pair (and its qdiscs); the namespace goes after it.
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "route", "del", "unreachable", self.subnet], capture_output=True)
