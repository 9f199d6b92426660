"""The request loop: one request at a time, each answered or refused, never a crash
for anything a request can contain.

An operation's module is imported when its first request comes: a service
that serves a turn's file tools and its snapshots never loads tarfile,
zipfile or hashlib, and starts in half the time (it is started for every turn
that runs a tool).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from .frames import Aborted, Frames, ProtocolError, widen_pipe
from .paths import Refused, Workspace, os_error_reply

if TYPE_CHECKING:  # typing costs the service's start-up time
    from typing import Any


if TYPE_CHECKING:
    Op = Callable[[Workspace, dict[str, Any], Frames], dict[str, Any] | None]

# request op -> (module, function)
OPS: dict[str, tuple[str, str]] = {
    "read_text": ("tools", "read_text"),
    "write_text": ("tools", "write_text"),
    "edit": ("tools", "edit"),
    "list": ("tools", "list_files"),
    "clear": ("tools", "clear"),
    "put": ("transfer", "put"),
    "open": ("transfer", "open_file"),
    "ls": ("transfer", "list_dir"),
    "rm": ("transfer", "remove"),
    "unpack": ("unpack", "unpack"),
    "pack": ("pack", "pack"),
    "snapshot": ("snapshot", "snapshot"),
    "changes": ("snapshot", "changes"),
}


def operation(name: str) -> Op:
    module, function = OPS[name]
    qualified = f"{__package__}.{module}"
    __import__(qualified)  # importlib itself is a few ms of start-up
    found: Op = getattr(sys.modules[qualified], function)
    return found


def serve(ws: Workspace, frames: Frames) -> None:
    while (request := frames.read_request()) is not None:
        reply: dict[str, Any] | None
        try:
            reply = operation(request["op"])(ws, request, frames)
        except Refused as exc:
            reply = exc.reply()
        except Aborted:
            reply = Refused("the client abandoned the request", "aborted").reply()
        except OSError as exc:
            reply = os_error_reply(ws, exc)
        except MemoryError:
            reply = Refused("the request needed more memory than the sandbox has", "io").reply()
        except (LookupError, TypeError, ValueError, ArithmeticError, zlib.error):
            reply = {"ok": False, "error": "malformed request", "code": "malformed"}
        # None: the operation wrote its last frame itself (data and its end).
        if reply is not None:
            frames.write_json(reply)
        frames.settle()


def main() -> None:
    ws = Workspace(sys.argv[1])
    os.chdir(ws.root)
    widen_pipe(0)
    widen_pipe(1)
    try:
        serve(ws, Frames(sys.stdin.buffer, 1))
    except (ProtocolError, json.JSONDecodeError):
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
