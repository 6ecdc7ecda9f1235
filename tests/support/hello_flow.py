"""The hello example flow, locked against the real Debian mirror, and a layer cache shared by a
module's builds (pytest plugin, loaded by tests/conftest.py): the reproducibility tests and the
QEMU test of the built image use the same fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cidboot.trust import keys
from imagebuilder import flowfile
from imagebuilder.lock import lock_path, make_lock

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer cache shared by the tests of this module (the first build fills it)."""
    return tmp_path_factory.mktemp("layer-cache")


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("flow") / "hello"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    keys.write_keypair(keys.generate(), d / "keys/signer-1")
    ff = flowfile.load(d / "flow.yaml")
    lock_path(ff.path).write_text(make_lock(ff).to_json())  # apt-get download into ~/.cache/cidboot (reused)
    return d / "flow.yaml"


def build_json(flow: Path, cache: Path, *out: str) -> dict[str, object]:
    """`imagebuilder build FLOW --json` with `cache` as the layer cache; its JSON result."""
    env = {**os.environ, "CIDBOOT_BUILD_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", *out],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))
