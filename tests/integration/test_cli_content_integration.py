"""The content-addressing CLIs as a user runs them: exit codes, stdout, stderr."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.kubo_node import KuboNode


def run(*args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, env={**os.environ, **(env or {})},
                          input=input, timeout=120)


@pytest.mark.kubo
def test_add_to_kubo(kubo: KuboNode, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(random.Random(3).randbytes(400_000))
    out = run("imagebuilder", "add", "--kubo", kubo.api_url, "--cid-version", "1", str(f))
    assert out.returncode == 0, out.stderr
    cid = out.stdout.decode().split()[-1]
    assert kubo.ipfs("add", "-Q", "--only-hash", "--cid-version=1", str(f)).strip() == cid
    assert kubo.ipfs_bytes("cat", cid) == f.read_bytes()
    assert cid in kubo.ipfs("pin", "ls", "--type=recursive")
