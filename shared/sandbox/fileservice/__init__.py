"""The file service that runs inside a sandbox: the agent's file tools and the files API.

`shared.sandbox.files.FileClient` starts it under the sandbox's own confinement
(bubblewrap, the sandbox's uid, its cgroup, no network), so whatever a request
names, the kernel decides what it can reach: not a path check in a privileged
process that a symlink swapped in at the right moment could defeat. Within
that, it keeps every operation inside the workspace root it is given, opens
regular files only and never blocks on a FIFO or a device, never follows a
symlink while walking, and bounds every walk in depth, entries and time.

It uses the standard library only: it runs as `python -I -S` and sees no
site-packages; this package directory is mounted read-only in the sandbox and
put on `sys.path` by the one-line bootstrap in `BOOTSTRAP`. Nothing it answers
is trusted by the client, which decodes each reply into a typed struct with
size limits.

The modules: `frames` (the protocol on stdin/stdout), `paths` (opening beneath
the workspace), `tools` (the agent's file tools), `transfer` (files in and
out), `unpack` and `pack` (archives), `snapshot` (what a turn changed),
`server` (the request loop).
"""

from __future__ import annotations

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Run with `python -I -S -B -c BOOTSTRAP <package parent> <workspace>`: isolated
# mode puts neither the script's directory nor the environment on sys.path.
BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from fileservice.server import main; main()"
)
