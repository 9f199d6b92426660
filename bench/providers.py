"""The providers alone: N model streams at once through a provider (the SDK's
request, the lean transport, the stream's decoding) against the paced model in
its own process, and this process's CPU per chunk. What the worker pays to read
a model's stream, apart from turning chunks into events and writing them."""

from __future__ import annotations

import asyncio
import os
import resource
from typing import Any

from bench.harness import user_message
from bench.streaming import paced_model
from shared.settings import Settings
from worker.providers.base import ProviderRequest

HEADER = ["", "CPU µs/chunk", "items", "seconds"]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _rounds(model: str, wire: str, count: int, chunks: int, rounds: int) -> list[list[str]]:
    os.environ.update(
        OPENAI_BASE_URL=model + "/v1",
        OPENAI_API_KEY="paced-key",
        ANTHROPIC_BASE_URL=model,
        ANTHROPIC_API_KEY="paced-key",
    )
    provider: Any
    if wire == "openai":
        from worker.providers.openai import OpenAIProvider

        provider = OpenAIProvider("paced", Settings())
    else:
        from worker.providers.anthropic import AnthropicProvider

        provider = AnthropicProvider("paced", Settings())
    request = ProviderRequest(system="", messages=[user_message("s", "t", "stream")], tools=[])

    async def one() -> int:
        return len([item async for item in provider.stream(request)])

    await asyncio.gather(*(one() for _ in range(min(count, 20))))  # connections made
    rows = []
    loop = asyncio.get_running_loop()
    for n in range(rounds):
        cpu, began = _cpu(), loop.time()
        items = await asyncio.gather(*(one() for _ in range(count)))
        spent, took = _cpu() - cpu, loop.time() - began
        rows.append(
            [
                f"{count} streams, {wire}, round {n + 1}",
                f"{spent / (count * chunks) * 1e6:.1f}",
                str(sum(items)),
                f"{took:.2f}",
            ]
        )
    return rows


def bench_providers(count: int, chunks: int, interval: float, rounds: int) -> list[list[str]]:
    rows = []
    with paced_model(chunks, interval) as model:
        for wire in ("openai", "anthropic"):
            rows += asyncio.run(_rounds(model, wire, count, chunks, rounds))
    return rows
