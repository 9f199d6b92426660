"""How a sandbox's processes are confined, decided once per process at start-up.

Every process that touches a sandbox (a `bash` command, the file service behind
the file tools) starts the same way: it joins the sandbox's cgroup, gets its
rlimits, enters the sandbox's private network (if any), and is set up by
bubblewrap with new pid, ipc, uts and cgroup namespaces (and a network
namespace of its own, or none at all), the system read-only, only the parts of
`/etc` ordinary programs need, a private `/tmp` and `/proc`, the workspace as
its only writable place, an empty environment and the seccomp filter; it dies
with its parent. When we run as root, bubblewrap sets this up as root (so the
workspace may sit anywhere) and the process then drops to the sandbox's own
uid: the process limit does not bind root, and a uid of its own is what the
disk quota and the other sandboxes' files are keyed on. Without root,
bubblewrap makes a user namespace instead, and cgroups, quotas and private
networks are not available (the start-up log says which parts are missing).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal

import msgspec

from shared.sandbox import fileservice
from shared.sandbox.cgroups import CgroupLimits, Cgroups, SandboxCgroup, detect_cgroups
from shared.sandbox.network import Networks, detect_networks
from shared.sandbox.process import Launch
from shared.sandbox.quota import DiskQuota, QuotaLimits, detect_quota
from shared.settings import Settings

logger = logging.getLogger("sandstream.sandbox")

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
WORKSPACE_MOUNT = "/workspace"
FILESERVICE_MOUNT = "/run/sandstream"
# The parts of /etc a shell and common tools need; the rest (service config,
# keys, the host's users) stays out of the sandbox. `passwd` and `group` are
# made for the sandbox: its own user, and no names of the host's.
_ETC_ENTRIES = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "host.conf",
    "hostname",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "profile",
    "protocols",
    "resolv.conf",
    "services",
    "ssl",
)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt")
# `echo 0 > cgroup.procs` moves the shell itself; what it execs stays there.
_JOIN_CGROUP = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'


class SandboxRefused(Exception):
    """This sandbox cannot be confined here as it must be; the message says why."""


class SandboxSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What confining one sandbox needs to know of it."""

    sandbox_id: str
    workspace: Path
    uid: int | None  # its own uid, used when we run as root
    network: bool


class Confinement:
    """What this process can do to confine sandboxes; made once by `detect`."""

    def __init__(
        self,
        *,
        kind: Literal["bubblewrap", "none", "refused"],
        settings: Settings,
        reason: str = "",
        cgroups: Cgroups | None = None,
        quota: DiskQuota | None = None,
        networks: Networks | None = None,
        seccomp: bytes | None = None,
        seccomp_info: str = "",
        notes: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.reason = reason
        self.privileged = os.geteuid() == 0
        self.memory_bytes = settings.sandbox_memory_bytes
        self.max_processes = settings.sandbox_max_processes
        self.file_bytes = settings.sandbox_file_bytes
        self.cgroups = cgroups
        self.quota = quota
        self.networks = networks
        self.seccomp = seccomp
        self.seccomp_info = seccomp_info
        # Why a part is missing, or what it is (for the start-up log).
        self.notes = notes or {}
        self.python = os.path.realpath(sys.executable)
        self.python_prefix = os.path.realpath(sys.base_prefix)

    @classmethod
    def detect(cls, settings: Settings, role: str, *, networks: bool = True) -> Confinement:
        """What this host offers. `role` names our cgroup subtree (worker, api);
        `networks`: whether this process runs network sandboxes' commands."""
        missing = [tool for tool in ("bwrap", "prlimit", "setpriv") if shutil.which(tool) is None]
        if missing:
            reason = (
                f"{', '.join(missing)} not found (install the bubblewrap and util-linux packages)"
            )
            kind: Literal["none", "refused"] = "none" if settings.allow_unisolated else "refused"
            return cls(kind=kind, settings=settings, reason=reason)
        notes: dict[str, str] = {}
        cgroups, notes["cgroups"] = detect_cgroups(
            role,
            CgroupLimits(
                memory_bytes=settings.sandbox_memory_bytes,
                max_processes=settings.sandbox_max_processes,
                cpus=settings.sandbox_cpus,
            ),
        )
        quota, notes["quota"] = detect_quota(
            Path(settings.sandbox_root).resolve(),
            QuotaLimits(bytes=settings.sandbox_disk_bytes, inodes=settings.sandbox_disk_inodes),
        )
        found_networks: Networks | None = None
        if networks:
            runtime = Path(tempfile.mkdtemp(prefix="sandstream-"))
            runtime.chmod(0o755)
            denied = tuple(c.strip() for c in settings.sandbox_network_deny.split(",") if c.strip())
            found_networks, notes["network"] = detect_networks(runtime, denied)
        seccomp: bytes | None = None
        seccomp_info = ""
        try:
            from shared.sandbox.seccomp import build_filter

            seccomp, seccomp_info = build_filter()
        except (ImportError, OSError, RuntimeError) as exc:
            notes["seccomp"] = f"libseccomp unavailable ({exc})"
        return cls(
            kind="bubblewrap",
            settings=settings,
            cgroups=cgroups,
            quota=quota,
            networks=found_networks,
            seccomp=seccomp,
            seccomp_info=seccomp_info,
            notes=notes,
        )

    # ---- what the start-up log says -------------------------------------------

    def describe(self) -> list[tuple[bool, str]]:
        """(all is well, line) for each part of the confinement."""
        if self.kind == "none":
            return [
                (
                    False,
                    f"WARNING: tools run UNISOLATED on this host ({self.reason}); "
                    "SANDSTREAM_ALLOW_UNISOLATED is set",
                )
            ]
        if self.kind == "refused":
            return [(False, self.refusal())]
        who = "its own uid per sandbox" if self.privileged else "this process's uid (no root)"
        networks = self.networks.describe() if self.networks else None
        cgroups = self.cgroups.describe() if self.cgroups else None
        quota = self.quota.describe() if self.quota else None
        seccomp = f"on ({self.seccomp_info})" if self.seccomp else None
        return [
            (True, f"tools run under bubblewrap as {who}"),
            self._part("network", networks, "network sandboxes are refused"),
            self._part("cgroups", cgroups, "no memory, process or CPU limit per sandbox"),
            self._part("quota", quota, "no disk quota per sandbox"),
            self._part("seccomp", seccomp, "no seccomp filter"),
        ]

    def _part(self, name: str, present: str | None, absent: str) -> tuple[bool, str]:
        if present:
            return True, f"{name}: {present}"
        return False, f"{name}: WARNING {absent} ({self.notes.get(name, 'unavailable')})"

    def refusal(self) -> str:
        return (
            f"tools are REFUSED: {self.reason}; set SANDSTREAM_ALLOW_UNISOLATED=true "
            "to run them without isolation"
        )

    def network_refusal(self) -> str | None:
        """Why a network sandbox's commands cannot run here, if they cannot."""
        if self.kind == "bubblewrap" and self.networks is None:
            return (
                "this sandbox may use the network, but this worker cannot give it a private "
                f"network ({self.notes.get('network', 'unavailable')}); refusing to share its own"
            )
        return None

    # ---- starting a confined process --------------------------------------------

    def launch(
        self,
        spec: SandboxSpec,
        inner: list[str],
        *,
        cgroup: SandboxCgroup | None = None,
        netns: str | None = None,
        cpu_seconds: int | None = None,
        file_service: bool = False,
    ) -> Launch:
        """argv and environment that run `inner` confined in the sandbox.

        `netns`: the path of the sandbox's private network namespace (network
        sandboxes' commands); otherwise the process has no network at all.
        `file_service`: also make the file service and its Python runtime visible."""
        if self.kind == "refused":
            raise SandboxRefused(self.refusal())
        if self.kind == "none":
            env = {"PATH": SAFE_PATH, "HOME": str(spec.workspace), "LANG": "C.UTF-8"}
            if file_service:
                inner = [
                    *(self.python, "-I", "-S", "-B", "-c", fileservice.BOOTSTRAP),
                    *(os.path.dirname(fileservice.PACKAGE_DIR), str(spec.workspace)),
                ]
            return Launch(argv=inner, env=env | {"TERM": "dumb"}, cwd=spec.workspace)
        argv: list[str] = []
        if cgroup is not None:
            argv += ["/bin/sh", "-c", _JOIN_CGROUP, "sh", *cgroup.procs_files, "--"]
        argv += ["prlimit"]
        if cpu_seconds is not None:
            argv.append(f"--cpu={cpu_seconds}")
        argv += [
            f"--as={self.memory_bytes}",
            f"--nproc={self.max_processes}",
            f"--fsize={self.file_bytes}",
            "--core=0",
            "--",
        ]
        uid = spec.uid if self.privileged else None
        if self.privileged and uid is None:
            raise SandboxRefused("the sandbox has no uid of its own; it cannot run as root")
        if netns is not None:
            argv += ["nsenter", f"--net={netns}", "--"]
        if uid is None:
            # Unprivileged: bubblewrap makes a user namespace for the other ones.
            argv += ["bwrap", "--unshare-all"]
        else:
            # As root: namespaces without a user namespace; the process drops
            # to the sandbox's uid (below), a real uid the limits apply to.
            argv += ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
            argv += ["--unshare-cgroup-try"]
            if netns is None:
                argv.append("--unshare-net")
        argv += ["--die-with-parent", "--new-session"]
        fds: list[int] = []
        argv += self._filesystem(spec, netns is not None, file_service, fds)
        argv += _users(uid if uid is not None else os.geteuid(), fds)
        argv += ["--chdir", WORKSPACE_MOUNT, "--clearenv"]
        for name, value in (
            ("PATH", SAFE_PATH),
            ("HOME", WORKSPACE_MOUNT),
            ("LANG", "C.UTF-8"),
            ("TERM", "dumb"),
        ):
            argv += ["--setenv", name, value]
        if self.seccomp is not None:
            fds.append(_data_fd(self.seccomp))
            argv += ["--seccomp", str(fds[-1])]
        argv.append("--")
        if uid is not None:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            argv += ["--no-new-privs", "--"]
        if file_service:
            inner = [self.python, "-I", "-S", "-B", "-c", fileservice.BOOTSTRAP]
            inner += [FILESERVICE_MOUNT, WORKSPACE_MOUNT]
        argv += inner
        env = {"PATH": SAFE_PATH}
        return Launch(argv=argv, env=env, cwd=spec.workspace, pass_fds=tuple(fds))

    def _filesystem(
        self, spec: SandboxSpec, networked: bool, file_service: bool, fds: list[int]
    ) -> list[str]:
        argv: list[str] = []
        for directory in _SYSTEM_DIRS:
            path = Path(directory)
            if path.is_symlink():
                argv += ["--symlink", os.readlink(path), directory]
            elif path.is_dir():
                argv += ["--ro-bind", directory, directory]
        argv += ["--perms", "0755", "--dir", "/etc"]
        for entry in _ETC_ENTRIES:
            if entry == "resolv.conf" and networked and self.networks is not None:
                argv += ["--ro-bind", str(self.networks.resolv_conf), "/etc/resolv.conf"]
            elif os.path.lexists(f"/etc/{entry}"):
                argv += ["--ro-bind", f"/etc/{entry}", f"/etc/{entry}"]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "1777", "--size", str(self.memory_bytes), "--tmpfs", "/tmp"]
        argv += ["--bind", str(spec.workspace), WORKSPACE_MOUNT]
        if file_service:
            if not any(self.python_prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
                argv += _directories_to(self.python_prefix)
                argv += ["--ro-bind", self.python_prefix, self.python_prefix]
            argv += [
                "--perms",
                "0755",
                "--dir",
                "/run",
                "--perms",
                "0755",
                "--dir",
                "/run/sandstream",
            ]
            argv += ["--ro-bind", fileservice.PACKAGE_DIR, FILESERVICE_MOUNT + "/fileservice"]
        return argv


def _directories_to(path: str) -> list[str]:
    """Traversable directories down to `path` (bubblewrap would make them 0700)."""
    argv: list[str] = []
    parts = Path(path).parts[1:-1]
    for depth in range(1, len(parts) + 1):
        argv += ["--perms", "0755", "--dir", "/" + "/".join(parts[:depth])]
    return argv


def _users(uid: int, fds: list[int]) -> list[str]:
    """/etc/passwd and /etc/group naming the sandbox's own user (`whoami` works,
    and nothing of the host's users shows)."""
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"sandbox:x:{uid}:{uid}:sandbox:{WORKSPACE_MOUNT}:/bin/bash\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nsandbox:x:{uid}:\nnogroup:x:65534:\n"
    argv: list[str] = []
    for path, text in (("/etc/passwd", passwd), ("/etc/group", group)):
        fds.append(_data_fd(text.encode()))
        argv += ["--perms", "0644", "--ro-bind-data", str(fds[-1]), path]
    return argv


def _data_fd(data: bytes) -> int:
    """A pipe holding `data` (the seccomp program, a generated file), for
    bubblewrap to read once."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)  # a few hundred bytes: well within a pipe's buffer
    finally:
        os.close(write_end)
    return read_end
