"""Settings: read from SANDSTREAM_* variables, validated, each one documented."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from shared.settings import Settings


def test_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SANDSTREAM_PORT": "9001",
            "SANDSTREAM_WORKER_FAST_PICKUP": "false",
            "SANDSTREAM_SEND_WAIT_SECONDS": "2.5",
            "SANDSTREAM_PROVIDER": "openai",
            "UNRELATED": "x",
        }
    )
    assert settings.port == 9001 and settings.worker_fast_pickup is False
    assert settings.send_wait_seconds == 2.5 and settings.provider == "openai"
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SANDSTREAM_PORT", "eighty"),
        ("SANDSTREAM_PROVIDER", "gemini"),
        ("SANDSTREAM_AUTH", "maybe"),
        ("SANDSTREAM_EVENT_GATHER_MAX_MS", "-1"),
        ("SANDSTREAM_EVENT_GATHER_MAX_MS", "nan"),
        ("SANDSTREAM_EVENT_GATHER_MAX_MS", "inf"),
    ],
)
def test_bad_settings_stop_the_process_with_a_message(name: str, value: str) -> None:
    with pytest.raises(SystemExit, match="invalid setting"):
        Settings.from_env({name: value})


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [
        f"SANDSTREAM_{field.name.upper()}"
        for field in msgspec.structs.fields(Settings)
        if f"`SANDSTREAM_{field.name.upper()}`" not in readme
    ]
    assert missing == []
