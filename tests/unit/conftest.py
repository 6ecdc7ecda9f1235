"""Fixtures more than one unit test module uses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attestation_api import AgentServer
from bench import common as bench_common
from tests.support.sync_log import SyncLog


@pytest.fixture(autouse=True)
def _no_vm_memory_knob(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bench's main run in a unit test (bench_boot's, run_all's) must not set this machine's
    page reporting knob (bench/common.py `hold_freed_memory`): it finds none."""
    monkeypatch.setattr(bench_common, "PAGE_REPORTING_DELAY", tmp_path / "no-page-reporting-knob")


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


@pytest.fixture
def sync_log(monkeypatch: pytest.MonkeyPatch) -> SyncLog:
    """fsync, fdatasync (still done), the block store's syncfs and os.sync (not done), recorded."""
    import cidboot.store.blockstore as bs

    log = SyncLog()

    def record(real: object) -> object:
        def sync(fd: int) -> None:
            log.files.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)  # type: ignore[operator]
        return sync

    monkeypatch.setattr(os, "fsync", record(os.fsync))
    monkeypatch.setattr(os, "fdatasync", record(os.fdatasync))
    monkeypatch.setattr(bs, "syncfs", log.whole.append)
    monkeypatch.setattr(os, "sync", lambda: log.whole.append("sync"))
    return log
