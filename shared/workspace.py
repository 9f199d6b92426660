"""Where a sandbox's workspace lives: one directory per sandbox under the root.

The root is shared by every worker (a volume), so any worker can run any turn.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.models import is_uuid


def workspace_path(root: str, sandbox_id: str) -> Path:
    if not is_uuid(sandbox_id):
        raise ValueError(f"not a sandbox id: {sandbox_id!r}")
    return Path(root).resolve() / sandbox_id


def create_workspace(root: str, sandbox_id: str) -> Path:
    path = workspace_path(root, sandbox_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def delete_workspace(root: str, sandbox_id: str) -> None:
    shutil.rmtree(workspace_path(root, sandbox_id), ignore_errors=True)
