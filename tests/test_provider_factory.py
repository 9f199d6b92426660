"""The worker's providers: made once per (provider, model), off the event loop,
the default agent's at start-up."""

from __future__ import annotations

import asyncio
import gc

import pytest

from shared.models import AgentConfig
from shared.settings import Settings
from worker.providers import ProviderFactory
from worker.providers.base import ProviderError


def _agent(provider: str, model: str) -> AgentConfig:
    agent = Settings().default_agent()
    agent.provider, agent.model = provider, model  # type: ignore[assignment]
    return agent


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-0123456789")


def test_warm_makes_the_default_agents_provider() -> None:
    settings = Settings(provider="openai", model="some-model")
    factory = ProviderFactory(settings)

    async def scenario() -> None:
        await factory.warm()
        made = await factory.get(settings.default_agent())
        assert made is await factory.get(_agent("openai", "some-model"))

    asyncio.run(scenario())
    assert list(factory._made) == [("openai", "some-model")]


def test_turns_that_start_together_share_one_new_provider() -> None:
    factory = ProviderFactory(Settings())
    agent = _agent("anthropic", "another-model")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def tick() -> None:  # the loop keeps running while the SDK loads
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = loop.create_task(tick())
        made = await asyncio.gather(*(factory.get(agent) for _ in range(5)))
        ticker.cancel()
        assert all(provider is made[0] for provider in made)
        assert ticks > 1

    asyncio.run(scenario())


def test_a_provider_that_cannot_be_made_fails_each_turn() -> None:
    factory = ProviderFactory(Settings())

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(ProviderError):
                await factory.get(_agent("openai", ""))

    asyncio.run(scenario())
    assert not factory._made and not factory._making


def test_a_provider_made_for_a_turn_is_kept_out_of_full_collections() -> None:
    """A model SDK first needed by a turn (not the default agent's, frozen with
    the start-up heap) is frozen once made: a full collection over an SDK's
    objects held the worker's event loop for 60 to 125 ms (bench 6e). Before,
    only the default provider's SDK was frozen."""
    factory = ProviderFactory(Settings(provider="demo"))
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        asyncio.run(factory.get(_agent("anthropic", "some-model")))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
