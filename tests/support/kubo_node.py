"""A real, isolated Kubo daemon for interop tests (pytest plugin, loaded by conftest.py).

The repo lives in a temp dir; no bootstrap peers, MDNS off, routing none, AutoConf off,
API/gateway/swarm on loopback only, so nothing leaves the machine. The binary is the pinned
one `.ci/setup.sh` builds (`$CIDBOOT_TOOLS/ipfs`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def kubo_binary() -> str:
    tools = os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin"))
    path = os.path.join(tools, "ipfs")
    if not os.access(path, os.X_OK):
        pytest.fail(f"Kubo binary not found at {path}: run `make setup` (.ci/setup.sh builds it)")
    return path


def isolated_config(api: int, gw: int) -> dict[str, str]:
    """Kubo settings (`ipfs config --json KEY VALUE`) for a node that talks to nothing but
    loopback: API and gateway on the given ports, no bootstrap peers, no MDNS, no routing, no
    AutoConf/AutoTLS, no NAT port mapping, a gateway that serves only what the node holds."""
    return {
        "Addresses.API": f'"/ip4/127.0.0.1/tcp/{api}"',
        "Addresses.Gateway": f'"/ip4/127.0.0.1/tcp/{gw}"',
        "Addresses.Swarm": '["/ip4/127.0.0.1/tcp/0"]',
        "Bootstrap": "[]",
        "Discovery.MDNS.Enabled": "false",
        "Routing.Type": '"none"',
        "AutoConf.Enabled": "false",
        "AutoTLS.Enabled": "false",
        "Swarm.DisableNatPortMap": "true",
        "Gateway.NoFetch": "true",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KuboNode:
    binary: str
    repo: Path
    api_url: str
    gateway_url: str

    def ipfs_bytes(self, *args: str) -> bytes:
        env = {**os.environ, "IPFS_PATH": str(self.repo)}
        out = subprocess.run([self.binary, *args], env=env, capture_output=True, timeout=300)
        if out.returncode:
            raise RuntimeError(f"ipfs {' '.join(args)} failed: {out.stderr.decode()}")
        return out.stdout

    def ipfs(self, *args: str) -> str:
        return self.ipfs_bytes(*args).decode()


def start_kubo(workdir: Path) -> tuple[KuboNode, subprocess.Popen[bytes]]:
    binary = kubo_binary()
    repo = workdir / "kubo-repo"
    env = {**os.environ, "IPFS_PATH": str(repo)}
    subprocess.run([binary, "init", "--profile", "test", "--empty-repo"], env=env, check=True, capture_output=True)
    api, gw = free_port(), free_port()
    settings = isolated_config(api, gw)
    for key, value in settings.items():
        subprocess.run([binary, "config", "--json", key, value], env=env, check=True, capture_output=True)
    log = open(workdir / "kubo.log", "wb")
    proc = subprocess.Popen([binary, "daemon"], env=env, stdout=log, stderr=subprocess.STDOUT)
    node = KuboNode(binary, repo, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{gw}")
    deadline = time.monotonic() + 60
    while True:
        try:
            req = urllib.request.Request(node.api_url + "/api/v0/version", method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                json.load(r)
            return node, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"Kubo daemon did not start: {(workdir / 'kubo.log').read_text()[-2000:]}") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KuboNode]:
    node, proc = start_kubo(tmp_path_factory.mktemp("kubo"))
    try:
        yield node
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
