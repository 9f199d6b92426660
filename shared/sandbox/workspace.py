"""Where a sandbox's workspace lives (one directory per sandbox under the root),
and how it is made ready: created (a subvolume, when the quota needs one),
given to the sandbox's uid, and limited by the disk quota.

The root is shared by every worker (a volume), so any worker can run any turn;
each worker prepares a workspace once (it is idempotent). Preparation touches
only the workspace directory itself, which sits in a root the sandbox cannot
write to; what is inside it is only ever touched from inside the sandbox.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from shared.models import is_uuid
from shared.sandbox.quota import DiskQuota

logger = logging.getLogger("sandstream.sandbox")


def workspace_path(root: str, sandbox_id: str) -> Path:
    if not is_uuid(sandbox_id):
        raise ValueError(f"not a sandbox id: {sandbox_id!r}")
    return Path(root).resolve() / sandbox_id


def prepare_workspace(root: str, sandbox_id: str, uid: int | None, quota: DiskQuota | None) -> Path:
    """The workspace, created if need be, owned by `uid` (when we may give it
    away) and under the quota. Blocking: run it off the event loop."""
    path = workspace_path(root, sandbox_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            if quota is not None:
                quota.create(path)
            else:
                path.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made at the same moment for another request of the same sandbox
    # What is there must be a directory of its own: not a file, a symlink (to
    # be followed by the chown, the quota and the sandbox's mounts) or a pipe.
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "the workspace is not a directory", str(path))
    if uid is not None and os.geteuid() == 0 and found.st_uid != uid:
        os.lchown(path, uid, uid)
    if quota is not None and not quota.apply(path, uid):
        logger.warning("workspace of sandbox %s has no disk quota (made before quotas)", sandbox_id)
    return path


def remove_empty_workspace(root: str, sandbox_id: str) -> None:
    """Remove the workspace once its content is gone (an empty btrfs subvolume
    goes the same way)."""
    path = workspace_path(root, sandbox_id)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("workspace of sandbox %s was not removed: %s", sandbox_id, exc.strerror)
