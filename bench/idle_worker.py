"""Redis commands per second caused by idle workers: ours against stock arq polling.

Counts the server's `total_commands_processed` over a quiet window with one
worker and no API, less the counting's own commands.

Run: python -m bench.idle_worker [--seconds 20]
"""

from __future__ import annotations

import argparse
import time

import redis

from bench.harness import private_redis, service


def idle_rate(url: str, seconds: float) -> float:
    client = redis.Redis.from_url(url)
    time.sleep(1.0)  # let start-up traffic pass
    before = int(client.info("stats")["total_commands_processed"])
    time.sleep(seconds)
    after = int(client.info("stats")["total_commands_processed"])
    return (after - before - 1) / seconds  # the second INFO counts itself


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    with private_redis() as url:
        with service(url, api=False):
            ours = idle_rate(url, args.seconds)
        with service(url, api=False, worker_fast_pickup="false"):
            stock = idle_rate(url, args.seconds)
    print(f"idle worker, {args.seconds:g} s window")
    print(f"{'':32} {'commands/s':>11} {'vs ours':>9}")
    print(f"{'sandstream (wake-up signal)':32} {ours:11.2f} {1.0:8.2f}x")
    print(f"{'stock arq polling (0.5 s)':32} {stock:11.2f} {stock / max(ours, 1e-9):8.2f}x")


if __name__ == "__main__":
    main()
