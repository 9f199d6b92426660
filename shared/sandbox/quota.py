"""A disk quota per sandbox, enforced by the filesystem that holds the workspaces.

The filesystem refuses the write that would pass the limit (`EDQUOT`) wherever
the writer runs, so a runaway command cannot exceed it by more than the
filesystem's allocation granularity, and no watcher has to catch up with it.
Two mechanisms, chosen by what the sandbox root's filesystem offers:

- `uid`: per-user quotas (ext4 or XFS mounted with `usrquota`). Every sandbox
  has its own uid, allocated once in Redis and the same on every host, so this
  is also what a root shared across worker hosts uses: an NFS server enforces
  its users' quotas on writes from every client (set them on the server, or
  through rquotad; quotactl works on local filesystems only). Limits: bytes
  and inodes.
- `btrfs`: each workspace is a subvolume with a qgroup limit on the bytes it
  references; file metadata counts in those bytes, which is what bounds the
  number of files (btrfs has no inode table to exhaust).

Without either, sandboxes have no disk quota and the start-up log says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Literal

import msgspec

_BTRFS_SUPER_MAGIC = 0x9123683E
_BTRFS_FIRST_FREE_OBJECTID = 256
# ioctl numbers from linux/btrfs.h (_IOW/_IOWR/_IOR on type 0x94).
_BTRFS_IOC_SUBVOL_CREATE = 0x5000940E  # struct btrfs_ioctl_vol_args (4096 bytes)
_BTRFS_IOC_INO_LOOKUP = 0xD0009412  # struct btrfs_ioctl_ino_lookup_args (4096 bytes)
_BTRFS_IOC_QUOTA_CTL = 0xC0109428  # struct btrfs_ioctl_quota_ctl_args
_BTRFS_IOC_QGROUP_LIMIT = 0x8030942B  # struct btrfs_ioctl_qgroup_limit_args
_BTRFS_QUOTA_CTL_ENABLE = 1
_BTRFS_QGROUP_LIMIT_MAX_RFER = 1

# quotactl_fd(2) (Linux 5.14), x86-64 and aarch64 alike.
_SYS_QUOTACTL_FD = 443
_Q_GETINFO = 0x800005
_Q_SETQUOTA = 0x800008
_USRQUOTA = 0
_QIF_BLIMITS = 1
_QIF_ILIMITS = 4
_QUOTA_BLOCK = 1024


class QuotaLimits(msgspec.Struct, frozen=True, kw_only=True):
    bytes: int
    inodes: int


class _Dqblk(ctypes.Structure):
    _fields_ = [
        ("bhardlimit", ctypes.c_uint64),
        ("bsoftlimit", ctypes.c_uint64),
        ("curspace", ctypes.c_uint64),
        ("ihardlimit", ctypes.c_uint64),
        ("isoftlimit", ctypes.c_uint64),
        ("curinodes", ctypes.c_uint64),
        ("btime", ctypes.c_uint64),
        ("itime", ctypes.c_uint64),
        ("valid", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _quotactl_fd(
    root: Path, cmd: int, ident: int, data: ctypes.Array[ctypes.c_char] | _Dqblk
) -> None:
    """quotactl_fd(2) for user quotas on the filesystem holding `root`."""
    command = ctypes.c_uint((cmd << 8) | _USRQUOTA)  # QCMD(cmd, USRQUOTA)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syscall(_SYS_QUOTACTL_FD, fd, command, ident, ctypes.byref(data)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


class DiskQuota:
    """Creates workspaces and limits what each may hold."""

    def __init__(self, kind: Literal["uid", "btrfs"], root: Path, limits: QuotaLimits) -> None:
        self.kind = kind
        self.root = root
        self.limits = limits

    def describe(self) -> str:
        size = f"{self.limits.bytes / (1 << 30):.2f} GiB"
        if self.kind == "uid":
            return f"per-uid filesystem quota on {self.root}: {size}, {self.limits.inodes} inodes"
        return f"btrfs subvolume per sandbox with a qgroup limit on {self.root}: {size}"

    def create(self, workspace: Path) -> None:
        """Make the workspace directory (a subvolume on btrfs)."""
        if self.kind == "btrfs":
            _btrfs_subvolume_create(workspace)
        else:
            workspace.mkdir(mode=0o700)

    def apply(self, workspace: Path, uid: int | None) -> bool:
        """Set the sandbox's limit; False when this workspace cannot have one (a
        directory made before quotas, or no uid of its own)."""
        if self.kind == "btrfs":
            fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if os.fstat(fd).st_ino != _BTRFS_FIRST_FREE_OBJECTID:
                    return False  # a plain directory, made before quotas were on
                _btrfs_limit(fd, _btrfs_subvolume_id(fd), self.limits.bytes)
            finally:
                os.close(fd)
            return True
        if uid is None:
            return False
        block = _Dqblk(
            bhardlimit=(self.limits.bytes + _QUOTA_BLOCK - 1) // _QUOTA_BLOCK,
            bsoftlimit=0,
            ihardlimit=self.limits.inodes,
            isoftlimit=0,
            valid=_QIF_BLIMITS | _QIF_ILIMITS,
        )
        _quotactl_fd(self.root, _Q_SETQUOTA, uid, block)
        return True


def _btrfs_subvolume_create(path: Path) -> None:
    name = path.name.encode()
    args = bytearray(struct.pack("q4088s", 0, name))
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _BTRFS_IOC_SUBVOL_CREATE, args)
    finally:
        os.close(fd)
    os.chmod(path, 0o700)


def _btrfs_subvolume_id(fd: int) -> int:
    args = bytearray(struct.pack("QQ4080s", 0, _BTRFS_FIRST_FREE_OBJECTID, b""))
    fcntl.ioctl(fd, _BTRFS_IOC_INO_LOOKUP, args)
    tree_id: int = struct.unpack_from("Q", args)[0]
    return tree_id


def _btrfs_limit(fd: int, subvolume_id: int, max_bytes: int) -> None:
    args = struct.pack("QQQQQQ", subvolume_id, _BTRFS_QGROUP_LIMIT_MAX_RFER, max_bytes, 0, 0, 0)
    fcntl.ioctl(fd, _BTRFS_IOC_QGROUP_LIMIT, args)


def _btrfs_enable_quotas(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(
            fd, _BTRFS_IOC_QUOTA_CTL, bytearray(struct.pack("QQ", _BTRFS_QUOTA_CTL_ENABLE, 0))
        )
    finally:
        os.close(fd)


def _has_user_quotas(root: Path) -> bool:
    try:
        _quotactl_fd(root, _Q_GETINFO, 0, ctypes.create_string_buffer(32))  # if_dqinfo
    except OSError:
        return False
    return True


def _is_btrfs(root: Path) -> bool:
    # statfs(2)'s f_type, which os.statvfs does not give.
    buffer = ctypes.create_string_buffer(120)
    if _libc.statfs(str(root).encode(), buffer) != 0:
        return False
    f_type: int = struct.unpack_from("q", buffer)[0]
    return f_type == _BTRFS_SUPER_MAGIC


def detect_quota(root: Path, limits: QuotaLimits) -> tuple[DiskQuota | None, str]:
    """The quota mechanism the sandbox root's filesystem offers, or None and why not."""
    if os.geteuid() != 0:
        return None, "not running as root"
    root.mkdir(parents=True, exist_ok=True)
    if _has_user_quotas(root):
        return DiskQuota("uid", root, limits), ""
    if _is_btrfs(root):
        try:
            _btrfs_enable_quotas(root)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                return None, f"cannot enable btrfs quotas on {root} ({exc.strerror})"
        return DiskQuota("btrfs", root, limits), ""
    return None, (
        f"{root} is on a filesystem without user quotas (mount it with usrquota) and is not btrfs"
    )
