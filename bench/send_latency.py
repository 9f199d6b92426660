"""p50/p90 of a blocking send of a plain demo message, against two baselines.

- `redis`: one Redis round trip (PING) from the same client machine: the floor.
- `stock arq`: the same service with the wake-up signal off, so workers find the
  turn by arq's default 0.5 s poll.

Run: python -m bench.send_latency [--sends 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import redis

from bench.harness import AUTH, private_redis, service

MESSAGE = {"role": "user", "content": [{"type": "text", "text": "hello"}]}


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.9) - 1]


def measure_sends(base: str, sends: int) -> list[float]:
    with httpx.Client(base_url=base + "/api/v1", timeout=30, headers=AUTH) as client:
        sandbox = client.post("/sandboxes", json={}).json()["id"]
        sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
        for _ in range(10):  # warm up connections and code paths
            client.post(f"/sessions/{sid}/messages", json=MESSAGE)
        samples = []
        for _ in range(sends):
            started = time.perf_counter()
            response = client.post(f"/sessions/{sid}/messages", json=MESSAGE)
            samples.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        return samples


def measure_ping(url: str, count: int) -> list[float]:
    client = redis.Redis.from_url(url)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sends", type=int, default=200)
    parser.add_argument("--baseline-sends", type=int, default=40)
    args = parser.parse_args()
    with private_redis() as url:
        with service(url) as base:
            ours = measure_sends(base, args.sends)
        with service(url, worker_fast_pickup="false") as base:
            stock = measure_sends(base, args.baseline_sends)
        ping = measure_ping(url, args.sends)
    rows = [
        ("sandstream (wake-up signal)", ours),
        ("stock arq polling (0.5 s)", stock),
        ("Redis PING round trip", ping),
    ]
    ours_p50 = _percentiles(ours)[0]
    print(f"blocking send of a plain demo message, {args.sends} sends")
    print(f"{'':32} {'p50 ms':>9} {'p90 ms':>9} {'p50 vs ours':>12}")
    for name, samples in rows:
        p50, p90 = _percentiles(samples)
        print(f"{name:32} {p50 * 1000:9.2f} {p90 * 1000:9.2f} {p50 / ours_p50:11.2f}x")


if __name__ == "__main__":
    main()
