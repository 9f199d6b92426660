"""Model providers behind one interface (`worker.providers.base.Provider`)."""

from __future__ import annotations

from shared.settings import Settings
from worker.providers.base import Provider, ProviderError
from worker.providers.demo import DemoProvider


def make_provider(name: str, settings: Settings) -> Provider:
    if name == "demo":
        return DemoProvider()
    raise ProviderError("provider_config", f"unknown provider {name!r}")
