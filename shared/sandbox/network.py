"""Private networks for sandboxes created with `"network": true`.

Sharing the worker's own network namespace would let a command reach whatever
the worker reaches: Redis on loopback, the API, the cloud's metadata service.
Instead such a sandbox gets a network namespace of its own, whose only way out
is slirp4netns, a user-mode TCP/IP stack that turns the sandbox's packets into
ordinary outbound connections made from the host: outbound only (nothing can
connect in), with the host's loopback refused by slirp itself
(`--disable-host-loopback`). Inside the namespace, `prohibit` routes, which
only root outside the sandbox can change, refuse the private, shared,
link-local (cloud metadata at 169.254.169.254), multicast and reserved ranges
and every address of the host itself. DNS goes to slirp's forwarder at
10.0.2.3, which asks the host's resolver.

Namespaces are named `ss-<pid>-<n>` after the process that made them, so one
that a crashed process left behind is removed by the next to start; slirp4netns
exits by itself when its creator dies (its exit pipe closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
from pathlib import Path

from shared.sandbox.process import process_alive

logger = logging.getLogger("sandstream.sandbox")

SLIRP_GATEWAY = "10.0.2.2"  # slirp's address for the host; refused below
SLIRP_DNS = "10.0.2.3"
# Never reachable from a sandbox. (127.0.0.0/8 inside the namespace is the
# sandbox's own loopback, with nothing of the host on it.)
DENIED_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    f"{SLIRP_GATEWAY}/32",
)
_SETUP_TIMEOUT = 10.0
_counter = itertools.count(1)


async def _run(*argv: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise OSError(f"{argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


async def host_addresses() -> list[str]:
    """Every IPv4 address of this host's interfaces."""
    found = json.loads(await _run("ip", "-j", "-4", "addr", "show"))
    return sorted(
        {
            info["local"]
            for link in found
            for info in link.get("addr_info", [])
            if info.get("family") == "inet" and not info["local"].startswith("127.")
        }
    )


async def _read_byte(fd: int) -> bytes:
    """One byte from a pipe, waiting on the event loop (no thread)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, 1)


class PrivateNetwork:
    """One sandbox's network namespace and the slirp4netns serving it."""

    def __init__(self, name: str, slirp: asyncio.subprocess.Process, exit_fd: int) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"
        self._slirp = slirp
        self._exit_fd = exit_fd

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._exit_fd)  # slirp4netns exits when this closes
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await asyncio.wait_for(self._slirp.wait(), 5)
        if self._slirp.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._slirp.kill()
        with contextlib.suppress(OSError):
            await _run("ip", "netns", "del", self.name)


class Networks:
    """Makes private networks (create with `detect_networks`)."""

    def __init__(self, slirp: str, extra_denied: tuple[str, ...], resolv_conf: Path) -> None:
        self._slirp = slirp
        self._extra_denied = extra_denied
        self.resolv_conf = resolv_conf

    def describe(self) -> str:
        return (
            "a private namespace per network sandbox through slirp4netns (outbound only; "
            "host, loopback, private, link-local and reserved ranges refused)"
        )

    async def create(self) -> PrivateNetwork:
        name = f"ss-{os.getpid()}-{next(_counter)}"
        await _run("ip", "netns", "add", name)
        try:
            return await asyncio.wait_for(self._start(name), _SETUP_TIMEOUT)
        except BaseException:
            with contextlib.suppress(OSError):
                await _run("ip", "netns", "del", name)
            raise

    async def _start(self, name: str) -> PrivateNetwork:
        await _run("ip", "-n", name, "link", "set", "lo", "up")
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            slirp = await asyncio.create_subprocess_exec(
                self._slirp,
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                f"--ready-fd={ready_w}",
                f"--exit-fd={exit_r}",
                "--netns-type=path",
                f"/run/netns/{name}",
                "tap0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                pass_fds=(ready_w, exit_r),
            )
        except BaseException:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise
        os.close(ready_w)
        os.close(exit_r)
        network = PrivateNetwork(name, slirp, exit_w)
        try:
            if await _read_byte(ready_r) != b"1":
                raise OSError("slirp4netns did not come up")
            denied = [*DENIED_RANGES, *(f"{a}/32" for a in await host_addresses())]
            denied += self._extra_denied
            routes = "".join(f"route add prohibit {cidr}\n" for cidr in denied)
            await _run("ip", "-n", name, "-batch", "-", stdin=routes.encode())
        except BaseException:
            await network.close()
            raise
        finally:
            os.close(ready_r)
        return network


async def forget_dead_namespaces() -> None:
    """Remove namespaces left by processes of ours that died."""
    with contextlib.suppress(OSError, ValueError):
        for entry in json.loads(await _run("ip", "-j", "netns", "list") or "[]"):
            parts = entry.get("name", "").split("-")
            if len(parts) == 3 and parts[0] == "ss" and parts[1].isdigit():
                pid = int(parts[1])
                if pid != os.getpid() and not process_alive(pid):
                    await _run("ip", "netns", "del", entry["name"])


def detect_networks(
    runtime_dir: Path, extra_denied: tuple[str, ...]
) -> tuple[Networks | None, str]:
    """Private networks, or None and why they are not available."""
    if os.geteuid() != 0:
        return None, "not running as root"
    missing = [tool for tool in ("slirp4netns", "ip") if shutil.which(tool) is None]
    if missing:
        return (
            None,
            f"{', '.join(missing)} not found (install the slirp4netns and iproute2 packages)",
        )
    resolv = runtime_dir / "resolv.conf"
    resolv.write_text(f"nameserver {SLIRP_DNS}\n")
    resolv.chmod(0o644)
    slirp = shutil.which("slirp4netns")
    assert slirp is not None
    return Networks(slirp, extra_denied, resolv), ""
