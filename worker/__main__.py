"""`python -m worker` / `sandstream-worker`: run one worker process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import uvloop

from shared.logs import configure_logging
from shared.ops import local_worker_healthy
from shared.queue import connect
from shared.settings import Settings
from worker.runtime import build_worker


async def _run(settings: Settings) -> None:
    worker, _ = await build_worker(settings)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        await worker.close()


async def _check(settings: Settings, pid: int | None) -> bool:
    redis = await connect(
        settings.redis_url,
        settings.redis_password,
        settings.redis_tls_ca_file,
        socket_timeout=settings.worker_socket_timeout(),
    )
    try:
        return await local_worker_healthy(redis, settings.worker_heartbeat_seconds * 3, pid)
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="sandstream-worker")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser(
        "check", help="exit 0 if a worker on this host (or with --pid) beats its heart, else 1"
    )
    check.add_argument("--pid", type=int, default=None)
    args = parser.parse_args()
    settings = Settings.from_env()
    if args.command == "check":
        try:
            healthy = asyncio.run(_check(settings, args.pid))
        except Exception as exc:  # Redis down counts as unhealthy
            print(f"unhealthy: {exc}", file=sys.stderr)
            sys.exit(1)
        print("healthy" if healthy else "unhealthy: no fresh heartbeat from a worker here")
        sys.exit(0 if healthy else 1)
    configure_logging(settings)
    uvloop.run(_run(settings))


if __name__ == "__main__":
    main()
