"""How a tool command is confined: bubblewrap, or (only when allowed) nothing.

Under bubblewrap a command gets new user, pid, ipc, uts, cgroup and network
namespaces (the network only when its sandbox allows it), a read-only system, a
private /tmp and /proc, the workspace as its only writable place, a scrubbed
environment, and dies with the worker. Resource limits come from `prlimit`.
When the worker runs as root, bubblewrap sets the sandbox up as root (so the
workspace may sit anywhere) and the command then drops to an unprivileged uid of
its sandbox: the kernel ignores the process-count limit for root, so a fork bomb
would otherwise go unchecked.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import msgspec

from shared.settings import Settings

logger = logging.getLogger("sandstream.isolation")

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
WORKSPACE_MOUNT = "/workspace"
# The parts of /etc a shell and common tools need; the rest (service config,
# keys) stays out of the sandbox.
_ETC_ENTRIES = (
    "alternatives",
    "bash.bashrc",
    "group",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "nsswitch.conf",
    "passwd",
    "profile",
    "resolv.conf",
    "ssl",
    "ca-certificates",
)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt")


class Isolation(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["bubblewrap", "none", "refused"]
    uid_base: int = 200_000
    memory_bytes: int = 1 << 30
    max_processes: int = 256
    file_bytes: int = 256 << 20
    reason: str = ""

    def uid_for(self, sandbox_id: str) -> int | None:
        """The unprivileged uid a sandbox's commands run as; None when not root."""
        if self.kind != "bubblewrap" or os.geteuid() != 0:
            return None
        return self.uid_base + int(sandbox_id.replace("-", "")[:8], 16) % 100_000


def choose_isolation(settings: Settings) -> Isolation:
    isolation = Isolation(
        kind="bubblewrap",
        uid_base=settings.sandbox_uid_base,
        memory_bytes=settings.sandbox_memory_bytes,
        max_processes=settings.sandbox_max_processes,
        file_bytes=settings.sandbox_file_bytes,
    )
    missing = [tool for tool in ("bwrap", "prlimit", "setpriv") if shutil.which(tool) is None]
    if not missing:
        return isolation
    reason = f"{', '.join(missing)} not found (install the bubblewrap and util-linux packages)"
    kind: Literal["none", "refused"] = "none" if settings.allow_unisolated else "refused"
    return msgspec.structs.replace(isolation, kind=kind, reason=reason)


def describe(isolation: Isolation) -> str:
    if isolation.kind == "bubblewrap":
        who = "an unprivileged uid per sandbox" if os.geteuid() == 0 else "the worker's uid"
        return f"tools run under bubblewrap as {who}"
    if isolation.kind == "none":
        return (
            f"WARNING: tools run UNISOLATED on this host ({isolation.reason}); "
            "SANDSTREAM_ALLOW_UNISOLATED is set"
        )
    return (
        f"tools are REFUSED: {isolation.reason}; set SANDSTREAM_ALLOW_UNISOLATED=true "
        "to run them without isolation"
    )


def command_argv(
    isolation: Isolation,
    command: str,
    workspace: Path,
    *,
    sandbox_id: str,
    network: bool,
    cpu_seconds: int,
) -> tuple[list[str], dict[str, str], Path]:
    """argv, environment and working directory that run `command` confined."""
    if isolation.kind == "none":
        env = {"PATH": SAFE_PATH, "HOME": str(workspace), "LANG": "C.UTF-8", "TERM": "dumb"}
        return ["/bin/bash", "-c", command], env, workspace
    if isolation.kind == "refused":
        raise PermissionError(describe(isolation))
    argv = [
        "prlimit",
        f"--cpu={cpu_seconds}",
        f"--as={isolation.memory_bytes}",
        f"--nproc={isolation.max_processes}",
        f"--fsize={isolation.file_bytes}",
        "--core=0",
        "--",
    ]
    uid = isolation.uid_for(sandbox_id)
    if uid is None:
        # Unprivileged: bubblewrap makes a user namespace for the other ones.
        argv += ["bwrap", "--unshare-all"]
    else:
        # As root: namespaces without a user namespace, and the command itself
        # drops to the sandbox's uid (below), a real uid the limits apply to.
        argv += ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try"]
        if not network:
            argv.append("--unshare-net")
    argv += ["--die-with-parent", "--new-session"]
    if network and uid is None:
        argv.append("--share-net")
    for directory in _SYSTEM_DIRS:
        path = Path(directory)
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), directory]
        elif path.is_dir():
            argv += ["--ro-bind", directory, directory]
    for entry in _ETC_ENTRIES:
        if os.path.lexists(f"/etc/{entry}"):
            argv += ["--ro-bind", f"/etc/{entry}", f"/etc/{entry}"]
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--bind",
        str(workspace),
        WORKSPACE_MOUNT,
        "--chdir",
        WORKSPACE_MOUNT,
        "--clearenv",
        "--setenv",
        "PATH",
        SAFE_PATH,
        "--setenv",
        "HOME",
        WORKSPACE_MOUNT,
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "TERM",
        "dumb",
        "--",
    ]
    if uid is not None:
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv += ["--no-new-privs", "--"]
    argv += ["/bin/bash", "-c", command]
    return argv, {"PATH": SAFE_PATH}, workspace


def own_workspace(isolation: Isolation, workspace: Path, sandbox_id: str) -> None:
    """Give the sandbox's uid its workspace, so confined commands can write there."""
    uid = isolation.uid_for(sandbox_id)
    if uid is None:
        return
    if workspace.stat().st_uid != uid:
        os.chown(workspace, uid, uid)


def own_path(isolation: Isolation, path: Path, sandbox_id: str, workspace: Path) -> None:
    """Hand a file the worker wrote (and the folders made for it) to the sandbox's uid."""
    uid = isolation.uid_for(sandbox_id)
    if uid is None:
        return
    root = workspace.resolve()
    current = path
    while current != root and current.is_relative_to(root):
        os.lchown(current, uid, uid)
        current = current.parent
