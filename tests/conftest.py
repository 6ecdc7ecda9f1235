"""Test tiers and their prerequisites (CONTRIBUTING.md, "Tests").

- `tests/unit/`: no root, no network, no QEMU, no Kubo, no downloads. `make check` runs these.
- `tests/integration/`: network namespaces (root), a real Kubo node, image builds that download
  pinned Debian packages and wheels, a real software TPM (swtpm + tpm2-tools, marker `tpm`).
- `tests/e2e/`: QEMU guests from power-on.
- `tests/support/`: helpers the tests and the benches share (not collected).

Each test gets its tier's marker from its directory. A test that needs something this machine
lacks (root for namespaces, QEMU, the pinned Kubo binary) is skipped with the reason, except in CI
(`CI=true`), where a missing prerequisite is a failure: CI installs everything (.ci/setup.sh), so
a skip there would hide a broken set-up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.kubo_node", "tests.support.cluster_node", "tests.support.hello_flow"]

TIERS = ("unit", "integration", "e2e")
HERE = Path(__file__).parent


def _missing(marker: str) -> str | None:
    if marker == "netns" and os.geteuid() != 0:
        return "needs root (network namespaces, taps, bridges)"
    if marker == "qemu" and shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64 (`make setup`)"
    if marker == "kubo":
        tools = os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin"))
        if not os.access(os.path.join(tools, "ipfs"), os.X_OK):
            return f"needs the pinned Kubo binary in {tools} (`make setup` builds it)"
    if marker == "cluster":
        tools = os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin"))
        if not all(os.access(os.path.join(tools, b), os.X_OK) for b in ("ipfs-cluster-service", "ipfs-cluster-ctl")):
            return f"needs the pinned ipfs-cluster-service/-ctl in {tools} (`make setup` builds them)"
    if marker == "tpm":
        from tests.support.swtpm import missing
        return missing()
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(HERE.resolve())
        tier = rel.parts[0] if rel.parts and rel.parts[0] in TIERS else None
        if tier is None:
            raise pytest.UsageError(f"{rel}: tests live in tests/unit, tests/integration or tests/e2e")
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "e2e":
            item.add_marker(pytest.mark.qemu)
        heavy = [m for m in ("netns", "qemu", "kubo", "cluster", "build", "tpm") if item.get_closest_marker(m)]
        if tier == "unit" and heavy:
            raise pytest.UsageError(f"{item.nodeid}: marked {', '.join(heavy)}, so it belongs in tests/integration "
                                    "or tests/e2e, not tests/unit")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("netns", "qemu", "kubo", "cluster", "tpm"):
        if item.get_closest_marker(marker) is None:
            continue
        why = _missing(marker)
        if why is None:
            continue
        if os.environ.get("CI") == "true":
            pytest.fail(f"{marker}: {why} (CI must provide it: see .ci/setup.sh)", pytrace=False)
        pytest.skip(f"{marker}: {why}")
