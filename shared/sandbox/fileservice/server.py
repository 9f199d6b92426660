"""The request loop: one request at a time, each answered or refused, never a crash
for anything a request can contain."""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Callable
from typing import Any

from .frames import Aborted, Frames, ProtocolError, widen_pipe
from .pack import pack
from .paths import Refused, Workspace, os_error_reply
from .snapshot import changes, snapshot
from .tools import TOOL_OPS
from .transfer import list_dir, open_file, put, remove
from .unpack import unpack

Op = Callable[[Workspace, dict[str, Any], Frames], "dict[str, Any] | None"]

OPS: dict[str, Op] = {
    **TOOL_OPS,
    "put": put,
    "open": open_file,
    "ls": list_dir,
    "rm": remove,
    "unpack": unpack,
    "pack": pack,
    "snapshot": snapshot,
    "changes": changes,
}


def serve(ws: Workspace, frames: Frames) -> None:
    while (request := frames.read_request()) is not None:
        reply: dict[str, Any] | None
        try:
            reply = OPS[request["op"]](ws, request, frames)
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
