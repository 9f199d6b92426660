"""Model providers behind one interface (`worker.providers.base.Provider`)."""

from __future__ import annotations

import asyncio
import importlib

from shared.models import AgentConfig
from shared.settings import Settings
from worker.providers.base import Provider, ProviderError
from worker.providers.demo import DemoProvider

# The module of each SDK-backed provider and its class.
_MODULES = {
    "anthropic": ("worker.providers.anthropic", "AnthropicProvider"),
    "openai": ("worker.providers.openai", "OpenAIProvider"),
}


class ProviderFactory:
    """One provider per (provider, model), kept for the worker's life.

    SDK clients hold connection pools; a turn reuses them instead of opening new
    connections to the model's API every time. An SDK takes a few seconds of CPU
    to import: that happens in a thread (the default provider's at start-up,
    `warm`), never on the event loop, where it would stall every running turn.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._made: dict[tuple[str, str], Provider] = {}

    async def warm(self) -> None:
        """Import the default provider's SDK before the first turn needs it."""
        if self.settings.provider in _MODULES:
            await asyncio.to_thread(importlib.import_module, _MODULES[self.settings.provider][0])

    async def get(self, agent: AgentConfig) -> Provider:
        key = (agent.provider, agent.model)
        if key not in self._made:
            self._made[key] = await self._make(agent)
        return self._made[key]

    async def _make(self, agent: AgentConfig) -> Provider:
        if agent.provider == "demo":
            return DemoProvider()
        if agent.provider not in _MODULES:
            raise ProviderError("provider_config", f"unknown provider {agent.provider!r}")
        if not agent.model:
            raise ProviderError("provider_config", f"provider {agent.provider} needs a model")
        module_name, class_name = _MODULES[agent.provider]
        module = await asyncio.to_thread(importlib.import_module, module_name)
        provider: Provider = getattr(module, class_name)(agent.model, self.settings)
        return provider
