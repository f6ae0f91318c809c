"""Fixtures of the fleet tests: what a real agent publishes, for tests that play devices."""

from __future__ import annotations

import pytest

from tests.conftest import Build
from tests.fleet_helpers import agent_payloads


@pytest.fixture(scope="module")
def real_payloads(default_build: Build, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """A telemetry window and a birth of the default build's model, made by the agent's own code."""
    return agent_payloads(default_build, tmp_path_factory.mktemp("template"))
