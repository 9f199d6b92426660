"""Model providers behind one interface (`worker.providers.base.Provider`)."""

from __future__ import annotations

import asyncio
import importlib
import logging

from shared.heap import freeze_new_objects
from shared.models import AgentConfig
from shared.settings import Settings
from worker.providers.base import Provider, ProviderError
from worker.providers.demo import DemoProvider

logger = logging.getLogger("sandstream.worker")

# The module of each SDK-backed provider and its class.
_MODULES = {
    "anthropic": ("worker.providers.anthropic", "AnthropicProvider"),
    "openai": ("worker.providers.openai", "OpenAIProvider"),
}


class ProviderFactory:
    """One provider per (provider, model), kept for the worker's life.

    SDK clients hold connection pools; a turn reuses them instead of opening new
    connections to the model's API every time. An SDK takes a few seconds of CPU
    to import, and its client a good part of a second more to load the resources
    it reaches lazily: both happen in a thread (the default agent's provider at
    start-up, `warm`), never on the event loop, where they would stall every
    running turn.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._made: dict[tuple[str, str], Provider] = {}
        # Providers being made: the turns that start meanwhile wait for the same one.
        self._making: dict[tuple[str, str], asyncio.Future[Provider]] = {}

    async def warm(self) -> None:
        """Make the default agent's provider (its SDK imported, its client ready)
        before the first turn needs it."""
        if self.settings.provider not in _MODULES:
            return
        try:
            if self.settings.model:
                await self.get(self.settings.default_agent())
                return
        except Exception as exc:  # its turns will meet it again, and report it
            logger.warning("the default provider could not be made ahead (%r)", exc)
        await asyncio.to_thread(importlib.import_module, _MODULES[self.settings.provider][0])

    async def get(self, agent: AgentConfig) -> Provider:
        key = (agent.provider, agent.model)
        made = self._made.get(key)
        if made is not None:
            return made
        making = self._making.get(key)
        if making is None:
            making = self._making[key] = asyncio.ensure_future(self._make(agent))
            making.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(making)

    def _settle(self, key: tuple[str, str], done: asyncio.Future[Provider]) -> None:
        del self._making[key]
        if not done.cancelled() and done.exception() is None:
            self._made[key] = done.result()

    async def _make(self, agent: AgentConfig) -> Provider:
        if agent.provider == "demo":
            return DemoProvider()
        if agent.provider not in _MODULES:
            raise ProviderError("provider_config", f"unknown provider {agent.provider!r}")
        if not agent.model:
            raise ProviderError("provider_config", f"provider {agent.provider} needs a model")
        module_name, class_name = _MODULES[agent.provider]
        model, settings = agent.model, self.settings

        def make() -> Provider:
            provider: Provider = getattr(importlib.import_module(module_name), class_name)(
                model, settings
            )
            return provider

        provider = await asyncio.to_thread(make)
        # The SDK's objects (imported now if not at start-up) are kept out of the
        # collector's full passes, as the start-up heap is (`shared.heap`).
        freeze_new_objects()
        return provider
