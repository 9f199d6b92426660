"""The worker's job pickup when the store fails it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq.worker import func
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.queue import connect
from worker.pickup import FastPickupWorker


async def _job(ctx: dict[str, Any]) -> str:
    return "ran"


def test_a_pickup_the_store_fails_gives_its_slot_back(redis_url: str) -> None:
    """Taking a job times out (a stalled Redis): the slot it held is free again,
    so a worker with one slot can still take the next job."""

    async def scenario() -> None:
        pool = await connect(redis_url)
        worker = FastPickupWorker(
            functions=[func(_job, name="job")],
            redis_pool=pool,
            queue_name=f"{keys.QUEUE}:pickup-test",
            max_jobs=1,
            on_control=lambda data: None,
            handle_signals=False,
        )

        async def stalled(**kwargs: Any) -> Any:
            raise RedisTimeoutError("Timeout reading from socket")

        worker._take_job = stalled  # type: ignore[assignment]
        try:
            for _ in range(3):
                with pytest.raises(RedisTimeoutError):
                    await asyncio.wait_for(worker.start_jobs([b"some-job"]), 1)
            assert worker.job_counter == 0
            assert not worker.sem.locked()
        finally:
            await pool.aclose()

    asyncio.run(scenario())
