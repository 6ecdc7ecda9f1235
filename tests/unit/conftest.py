"""Fixtures more than one unit test module uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.attestation_api import AgentServer


@pytest.fixture
def servers() -> Iterator[list[AgentServer]]:
    """Agent API servers a test started: each is shut down and closed when the test ends,
    passed or failed, so no listener outlives its test."""
    out: list[AgentServer] = []
    yield out
    for s in out:
        s.shutdown()
        s.server_close()


@pytest.fixture(params=[True, False], ids=["c", "python"])
def tftp_native(request: pytest.FixtureRequest) -> bool:
    """The TFTP server's lock-step loop: the C module (`native=True`) and the Python fallback
    both run every test that takes this fixture, so the two cannot drift. The C one must be
    built (`pip install -e .`): without it those tests fail, they do not skip."""
    return bool(request.param)
