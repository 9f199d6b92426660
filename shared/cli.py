"""`sandstream`: the service from the command line.

`sandstream ops queues|workers [--watch]`: the ops endpoints as tables, for
people, with an admin key (`--key`, default `SANDSTREAM_ADMIN_KEY`);
`sandstream files ...` and `sandstream archive ...` (`shared.cli_files`): a
sandbox's files, with a tenant's key (default `SANDSTREAM_API_KEY`). All talk
to the API at `--url` (default `SANDSTREAM_URL` or http://127.0.0.1:8000).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import httpx

from shared.cli_files import add_commands, main_files


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def render_queues(queues: list[dict[str, Any]]) -> str:
    rows = []
    for q in queues:
        durations = q.get("turn_duration_ms") or {}
        outcomes = q.get("turns_last_hour") or {}
        rows.append(
            [
                q["name"],
                str(q["queued"]),
                str(q["deferred"]),
                str(q["in_progress"]),
                f"{q['oldest_queued_seconds']:.1f}s",
                str(q["running_turns"]),
                ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "-",
                f"{durations['p50']}/{durations['p99']} ms" if durations else "-",
            ]
        )
    header = [
        "queue",
        "queued",
        "deferred",
        "in progress",
        "oldest",
        "running",
        "last hour",
        "duration p50/p99",
    ]
    return _table(header, rows)


def render_workers(workers: list[dict[str, Any]]) -> str:
    rows = [
        [
            w["worker_id"],
            w["host"],
            str(w["pid"]),
            str(w["running_turns"]),
            f"{w['seconds_since_heartbeat']:.1f}s ago",
        ]
        for w in workers
    ]
    return (
        _table(["worker", "host", "pid", "running", "heartbeat"], rows)
        if rows
        else "no live workers"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandstream")
    sub = parser.add_subparsers(dest="group", required=True)
    ops = sub.add_parser("ops", help="look at the queues and workers")
    ops.add_argument("what", choices=["queues", "workers"])
    ops.add_argument("--url", default=os.environ.get("SANDSTREAM_URL", "http://127.0.0.1:8000"))
    ops.add_argument("--key", default=os.environ.get("SANDSTREAM_ADMIN_KEY", ""))
    ops.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("SANDSTREAM_URL", "http://127.0.0.1:8000"))
    common.add_argument("--key", default=os.environ.get("SANDSTREAM_API_KEY", ""))
    add_commands(sub, common)
    args = parser.parse_args(argv)
    if args.group != "ops":
        return main_files(args)
    render = render_queues if args.what == "queues" else render_workers
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=10) as client:
        while True:
            try:
                response = client.get(f"/api/v1/ops/{args.what}")
            except httpx.HTTPError as exc:
                print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
                return 2
            if response.status_code != 200:
                detail = response.json().get("detail", response.text)
                print(f"{response.status_code}: {detail}", file=sys.stderr)
                return 1
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render(response.json()))
            if not args.watch:
                return 0
            time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
