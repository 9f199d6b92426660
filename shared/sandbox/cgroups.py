"""A cgroup per sandbox: its processes together get a memory limit, a process
limit and a CPU quota, whatever they do (per-process rlimits let six 900 MB
processes take 5.4 GB between them).

Both cgroup versions are supported. With v1 (separate `memory`, `pids` and `cpu`
hierarchies) each process of ours (worker or API) gets a subtree
`sandstream/<owner>/<sandbox id>` in each hierarchy. With v2 the process's own
cgroup must be delegated to it (systemd `Delegate=yes`, or a container's own
namespace): the process moves itself into a `service` leaf so the cgroup can
enable controllers for its children, and sandboxes live under
`sandboxes/<owner>/<sandbox id>`.
Either way the limits hold per sandbox and per process of ours; a process
cleans up after others of its kind that died (their subtrees are empty then).

Commands join their sandbox's cgroup before they exec anything (the launch
writes to `cgroup.procs`), so everything they start is counted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

import msgspec

from shared.sandbox.process import process_alive

CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000


class CgroupLimits(msgspec.Struct, frozen=True, kw_only=True):
    memory_bytes: int
    max_processes: int
    cpus: float


class Walls(msgspec.Struct, frozen=True):
    """Counters that rise when a sandbox hits a wall."""

    oom_kills: int = 0
    process_limit_hits: int = 0

    def hit_since(self, before: Walls) -> list[str]:
        hit = []
        if self.oom_kills > before.oom_kills:
            hit.append("memory")
        if self.process_limit_hits > before.process_limit_hits:
            hit.append("processes")
        return hit


def _counter(path: Path, name: str) -> int:
    """`name N` from a flat-keyed cgroup file, or 0."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    return 0


def _remove_tree(path: Path) -> None:
    """rmdir a cgroup and its children, deepest first (only empty ones go)."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


class SandboxCgroup:
    """One sandbox's cgroup in this process; released when no turn uses it."""

    def __init__(self, owner: Cgroups, sandbox_id: str, dirs: dict[str, Path]) -> None:
        self._owner = owner
        self.sandbox_id = sandbox_id
        self.dirs = dirs
        self.users = 0

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes itself into to join (one per hierarchy)."""
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def walls(self) -> Walls:
        if self._owner.version == 1:
            return Walls(
                oom_kills=_counter(self.dirs["memory"] / "memory.oom_control", "oom_kill"),
                process_limit_hits=_counter(self.dirs["pids"] / "pids.events", "max"),
            )
        only = self.dirs["unified"]
        return Walls(
            oom_kills=_counter(only / "memory.events", "oom_kill"),
            process_limit_hits=_counter(only / "pids.events", "max"),
        )

    def release(self) -> None:
        self._owner.release(self)


class Cgroups:
    """This process's sandbox cgroups (create with `detect_cgroups`)."""

    def __init__(
        self, version: Literal[1, 2], bases: dict[str, Path], limits: CgroupLimits
    ) -> None:
        self.version = version
        self.bases = bases  # controller (or "unified") -> this process's subtree
        self.limits = limits
        self._open: dict[str, SandboxCgroup] = {}

    def describe(self) -> str:
        where = ", ".join(str(p) for p in self.bases.values())
        what = "memory, pids, cpu"
        return f"cgroup v{self.version} ({what}) under {where}"

    def acquire(self, sandbox_id: str) -> SandboxCgroup:
        group = self._open.get(sandbox_id)
        if group is None:
            dirs = {name: base / sandbox_id for name, base in self.bases.items()}
            for directory in dirs.values():
                directory.mkdir(exist_ok=True)
            self._apply_limits(dirs)
            group = self._open[sandbox_id] = SandboxCgroup(self, sandbox_id, dirs)
        group.users += 1
        return group

    def release(self, group: SandboxCgroup) -> None:
        group.users -= 1
        if group.users > 0 or self._open.get(group.sandbox_id) is not group:
            return
        del self._open[group.sandbox_id]
        for directory in group.dirs.values():
            with contextlib.suppress(OSError):  # still busy: a process outlived its turn
                directory.rmdir()

    def close(self) -> None:
        for base in self.bases.values():
            _remove_tree(base)

    def _apply_limits(self, dirs: dict[str, Path]) -> None:
        limits = self.limits
        quota = max(1000, int(limits.cpus * _CPU_PERIOD_US))
        if self.version == 1:
            (dirs["memory"] / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            swap = dirs["memory"] / "memory.memsw.limit_in_bytes"
            if swap.exists():  # memory plus swap: no way around the limit through swap
                with contextlib.suppress(OSError):
                    swap.write_text(str(limits.memory_bytes))
            (dirs["pids"] / "pids.max").write_text(str(limits.max_processes))
            (dirs["cpu"] / "cpu.cfs_period_us").write_text(str(_CPU_PERIOD_US))
            (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
            return
        only = dirs["unified"]
        (only / "memory.max").write_text(str(limits.memory_bytes))
        with contextlib.suppress(OSError):
            (only / "memory.swap.max").write_text("0")
        (only / "pids.max").write_text(str(limits.max_processes))
        (only / "cpu.max").write_text(f"{quota} {_CPU_PERIOD_US}")


def _v1_mounts() -> dict[str, Path]:
    """Mount points of the v1 hierarchies holding each controller we need."""
    found: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            before, _, after = line.partition(" - ")
            fields = after.split()
            if len(fields) < 3 or fields[0] != "cgroup":
                continue
            options = set(fields[2].split(","))
            for controller in _V1_CONTROLLERS:
                if controller in options:
                    found[controller] = Path(before.split()[4])
    return found


def _own_v2_cgroup() -> Path | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return CGROUP_ROOT / line[3:].lstrip("/")
    return None


def _setup_v1(owner: str, limits: CgroupLimits) -> Cgroups | None:
    mounts = _v1_mounts()
    if any(c not in mounts for c in _V1_CONTROLLERS):
        return None
    bases = {}
    for controller, mount in mounts.items():
        top = mount / "sandstream"
        top.mkdir(exist_ok=True)
        _forget_dead_owners(top)
        base = top / owner
        base.mkdir(exist_ok=True)
        bases[controller] = base
    return Cgroups(1, bases, limits)


def _setup_v2(owner: str, limits: CgroupLimits) -> Cgroups | None:
    own = _own_v2_cgroup()
    if own is None or not (CGROUP_ROOT / "cgroup.controllers").exists():
        return None
    wanted = {"memory", "pids", "cpu"}
    if not wanted <= set((own / "cgroup.controllers").read_text().split()):
        return None
    if own != CGROUP_ROOT:
        # No processes may sit in a cgroup that gives controllers to its
        # children (the root excepted): this process moves into a leaf first.
        leaf = own / "service"
        leaf.mkdir(exist_ok=True)
        for pid in (own / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (leaf / "cgroup.procs").write_text(pid)
    enable = " ".join(f"+{c}" for c in sorted(wanted))
    (own / "cgroup.subtree_control").write_text(enable)
    top = own / "sandboxes"
    top.mkdir(exist_ok=True)
    (top / "cgroup.subtree_control").write_text(enable)
    _forget_dead_owners(top)
    base = top / owner
    base.mkdir(exist_ok=True)
    (base / "cgroup.subtree_control").write_text(enable)
    return Cgroups(2, {"unified": base}, limits)


def _forget_dead_owners(top: Path) -> None:
    for child in top.iterdir():
        pid = child.name.rsplit("-", 1)[-1]
        if child.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            _remove_tree(child)


def detect_cgroups(role: str, limits: CgroupLimits) -> tuple[Cgroups | None, str]:
    """This process's sandbox cgroups, or None and why not."""
    if os.geteuid() != 0:
        return None, "not running as root"
    owner = f"{role}-{os.getpid()}"
    try:
        cgroups = _setup_v1(owner, limits) or _setup_v2(owner, limits)
    except OSError as exc:
        return None, f"cannot create cgroups ({exc.strerror})"
    if cgroups is None:
        return None, "no cgroup hierarchy with the memory, pids and cpu controllers"
    return cgroups, ""
