"""A real, isolated Kubo daemon for interop tests (pytest plugin, loaded by conftest.py).

The node itself (settings, start-up) is `qemu.harness.cluster`, shared with the harness's cluster
labs: the repo lives in a temp dir; no bootstrap peers, MDNS off, routing none, AutoConf off,
API/gateway/swarm on loopback only, so nothing leaves the machine. The binary is the pinned one
`.ci/setup.sh` builds (`$CIDBOOT_TOOLS/ipfs`); a missing one fails the test with that hint.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu.harness import cluster as _impl
from qemu.harness.cluster import ClusterLabError, KuboNode, free_port, isolated_config

__all__ = ["KuboNode", "free_port", "isolated_config", "kubo_binary", "start_kubo"]


def kubo_binary() -> str:
    try:
        return _impl.tool("ipfs")
    except ClusterLabError as e:
        pytest.fail(str(e))


def start_kubo(workdir: Path) -> tuple[KuboNode, subprocess.Popen[bytes]]:
    kubo_binary()
    return _impl.start_kubo(workdir)


@pytest.fixture(scope="session")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KuboNode]:
    node, proc = start_kubo(tmp_path_factory.mktemp("kubo"))
    try:
        yield node
    finally:
        _impl.stop(proc)
