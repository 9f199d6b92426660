"""What a turn costs apart from its chunks: N turns at once of a model that
streams 2 chunks, through the streaming benchmark's service and clients
(`bench.streaming.measure`). Reported per turn: the worker's and the API's CPU,
Redis's CPU and commands, and the commands that make them (INFO commandstats,
those run inside scripts included). Divided by a turn's chunks, this is the part
of the streaming benchmark's per-chunk figures that no change to the per-chunk
path can remove.
"""

from __future__ import annotations

from bench.streaming import measure, paced_model

CHUNKS = 2
INTERVAL = 0.005
# Commands shown by name; the rest are summed.
SHOWN = 12

HEADER = [
    "",
    "worker ms/turn",
    "API ms/turn",
    "Redis µs/turn",
    "Redis cmds/turn",
    "the most called, per turn",
]


def bench_turn_cost(redis_url: str, wires: list[str], count: int) -> list[list[str]]:
    rows = []
    with paced_model(CHUNKS, INTERVAL) as model:
        for wire in wires:
            run = measure(redis_url, model, wire, count)
            calls = sorted(run.redis_calls.items(), key=lambda item: -item[1])
            named = ", ".join(f"{name} {n / count:.2f}" for name, n in calls[:SHOWN])
            rest = sum(n for _, n in calls[SHOWN:]) / count
            rows.append(
                [
                    f"{count} turns of {CHUNKS} chunks, {wire}",
                    f"{run.worker_cpu / count * 1e3:.2f}",
                    f"{run.api_cpu / count * 1e3:.2f}",
                    f"{run.redis_cpu / count * 1e6:.0f}",
                    f"{run.redis_commands / count:.1f}",
                    f"{named}, the rest {rest:.2f}",
                ]
            )
    return rows
