"""The seccomp filter of sandboxed processes, built with libseccomp (pyseccomp).

Namespaces, an unprivileged uid and no capabilities already keep a command
from most of the kernel; the filter takes away what an unprivileged process may
still reach and a sandbox never needs: new user namespaces (inside one a
process is root again, and much kernel code becomes reachable), the kernel
keyring, BPF, perf events, ptrace, kernel modules, mounts, and a few other
interfaces with a history of exploits. They fail with EPERM, so a program
sees an ordinary refusal. `clone3` fails with ENOSYS: its flags live in memory a
filter cannot inspect, and the C library then falls back to `clone`, whose
namespace flags it can. System calls of another architecture (32-bit calls
from a 64-bit process) kill the process, libseccomp's default.

bubblewrap loads the compiled program right before it runs the command
(`--seccomp FD`); bubblewrap's own setup is not filtered.
"""

from __future__ import annotations

import errno
import tempfile

DENIED = (
    # namespaces and mounts
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # the kernel keyring
    "keyctl",
    "add_key",
    "request_key",
    # tracing and other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "perf_event_open",
    "bpf",
    "userfaultfd",
    # kernel modules, kexec and the machine
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "open_by_handle_at",
    "name_to_handle_at",
    "iopl",
    "ioperm",
    "lookup_dcookie",
)
# The namespace flags of clone(2): CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
# NEWUSER, NEWPID, NEWNET, NEWTIME.
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000
CLONE_NAMESPACE_FLAGS |= 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080


def build_filter() -> tuple[bytes, str]:
    """The compiled BPF program and what built it; raises ImportError or OSError
    when libseccomp is missing."""
    import pyseccomp as seccomp  # type: ignore[import-untyped]

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    refused = seccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            rules.add_rule(refused, name)
        except ValueError:  # unknown to this libseccomp: an older kernel's table
            continue
    for flag in _bits(CLONE_NAMESPACE_FLAGS):
        rules.add_rule(refused, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        compiled = program.read()
    return compiled, f"libseccomp API level {seccomp.get_api()}, {len(DENIED)} calls refused"


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]
