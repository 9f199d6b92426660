"""Property-based run of schemathesis against the live API and its OpenAPI document.

Bounded (a fixed seed and a few dozen examples per operation) so it fits CI; it
fails on any server error and on any response the document does not allow.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ADMIN_KEY, Stack


def test_schemathesis_finds_no_server_error_or_schema_violation(
    stack: Stack, tmp_path: Path
) -> None:
    binary = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [
            str(binary),
            "run",
            stack.base_url + "/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--max-examples",
            "25",
            "--seed",
            "20261128",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,"
            "content_type_conformance",
            "--request-timeout",
            "15",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    assert " passed" in summary and "failed" not in summary.split("SUMMARY")[-1]
