"""`python -m worker` / `sandstream-worker`: run one worker process."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shared.settings import Settings
from worker.runtime import build_worker


async def _run(settings: Settings) -> None:
    worker, _ = await build_worker(settings)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        await worker.close()


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_run(settings))


if __name__ == "__main__":
    main()
