"""Model providers behind one interface (`worker.providers.base.Provider`)."""

from __future__ import annotations

from shared.models import AgentConfig
from shared.settings import Settings
from worker.providers.base import Provider, ProviderError
from worker.providers.demo import DemoProvider


class ProviderFactory:
    """One provider per (provider, model), kept for the worker's life.

    SDK clients hold connection pools; a turn reuses them instead of opening new
    connections to the model's API every time.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._made: dict[tuple[str, str], Provider] = {}

    def get(self, agent: AgentConfig) -> Provider:
        key = (agent.provider, agent.model)
        if key not in self._made:
            self._made[key] = self._make(agent)
        return self._made[key]

    def _make(self, agent: AgentConfig) -> Provider:
        if agent.provider == "demo":
            return DemoProvider()
        if not agent.model:
            raise ProviderError("provider_config", f"provider {agent.provider} needs a model")
        if agent.provider == "anthropic":
            from worker.providers.anthropic import AnthropicProvider

            return AnthropicProvider(agent.model, self.settings)
        if agent.provider == "openai":
            from worker.providers.openai import OpenAIProvider

            return OpenAIProvider(agent.model, self.settings)
        raise ProviderError("provider_config", f"unknown provider {agent.provider!r}")
