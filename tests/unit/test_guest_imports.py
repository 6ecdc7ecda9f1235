"""The guest/host import boundary (docs/adr/0002): what runs inside a boot stage imports no host tool.

The minimal images carry only the modules their stage imports, and scapy, pyroute2, tftpy and
ipfshttpclient are not among them: an import of one in guest code is a boot that dies with
ModuleNotFoundError on the device, far from the change that caused it. Two checks: every import
statement in guest code (including lazy ones inside functions), and a real import of each stage's
entry point with those modules made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST_ONLY = {"scapy", "pyroute2", "tftpy", "ipfshttpclient", "qemu", "yaml", "jsonschema", "elftools"}
# packages whose every module may run in a guest stage
GUEST_PACKAGES = ["cidboot/ipld", "cidboot/trust", "cidboot/netboot", "cidboot/stage", "bootstrap/stage", "firmware"]
# host-only modules of cidboot that guest code must not reach either
HOST_ONLY_CIDBOOT = {"cidboot.store.kubo"}
STAGE_ENTRY_POINTS = ["firmware.stage", "bootstrap.stage.main", "agent.device"]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _guest_files() -> list[Path]:
    files = [f for pkg in GUEST_PACKAGES for f in sorted((REPO / pkg).rglob("*.py"))]
    assert files, "no guest code found: GUEST_PACKAGES is out of date"
    return files


def test_guest_code_imports_no_host_tool() -> None:
    problems = []
    for f in _guest_files():
        for line, mod in _imports(f):
            top = mod.split(".")[0]
            if top in HOST_ONLY or any(mod == h or mod.startswith(h + ".") for h in HOST_ONLY_CIDBOOT):
                problems.append(f"{f.relative_to(REPO)}:{line}: imports {mod}")
    assert not problems, "guest code imports host-only modules:\n" + "\n".join(problems)


def test_the_import_check_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a lazy import inside a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from scapy.all import Ether\n    import pyroute2\n")
    assert [m for _, m in _imports(bad)] == ["scapy.all", "pyroute2"]


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[2].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"host-only module {name} imported by guest code")
sys.meta_path.insert(0, Block())
import importlib
importlib.import_module(sys.argv[1])
"""


@pytest.mark.parametrize("entry", STAGE_ENTRY_POINTS)
def test_stage_entry_point_imports_without_host_tools(entry: str) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKER, entry, ",".join(sorted(HOST_ONLY))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# what a stage's entry must not import at start (docs/images.md, "Start-up"): each is imported where
# its path runs (the agent's flow after `agent ready`, TPM and private-image code when a boot or a
# peer needs it, cpio only to write a kexec hand-off); under TCG each costs tens of ms at every boot
NOT_AT_START = {
    "firmware.stage": ("cidboot.stage.cpio", "cidboot.trust", "cryptography"),
    "bootstrap.stage.main": ("cidboot.stage.cpio", "cidboot.trust.tpm", "cidboot.trust.private",
                             "cidboot.ipld.unixfs.importer", "cryptography.hazmat.primitives.serialization",
                             "bootstrap.stage.tpm", "asyncio"),
    "agent.device": ("cidboot.stage.cpio", "cidboot.trust.tpm", "cidboot.trust.private", "cidboot.dataflow",
                     "cidboot.ipld.unixfs.importer", "cryptography.hazmat.primitives.serialization",
                     "agent.publish", "agent.orchestrator", "agent.tpm", "asyncio", "tempfile",
                     "cidboot.store.gateway.upstream", "cidboot.store.gateway.request", "cidboot.store.gateway.pathing",
                     # appraising other devices, and the flow's audit log: on first use (agent.device.BootedAgent)
                     "cidboot.trust.appraisal", "agent.peers", "agent.verifier", "agent.attested", "agent.audit",
                     "cidboot.trust.dice.software",
                     # the API reads requests with cidboot.httpd_lite; /ipfs/ connections load the gateway's handler
                     "http.server", "socketserver", "html", "mimetypes", "cidboot.httpd", "cidboot.store.gateway.server",
                     "agent.api_gateway",
                     # the boot blocks come with one plain GET (agent.blockfetch); the full client on a fallback
                     "cidboot.store.gateway.client", "http.client", "ssl", "email"),
}


# imported later on every path to the stage's ready line: they must not bring the above back
ON_THE_WAY = {"firmware.stage": "firmware.netboot", "bootstrap.stage.main": "bootstrap.stage.verify, cidboot.trust.keys",
              "agent.device": "cidboot.trust.registry, cidboot.netboot.dhcp_client"}


@pytest.mark.parametrize("entry", STAGE_ENTRY_POINTS)
def test_stage_entry_point_imports_only_what_its_start_needs(entry: str) -> None:
    code = f"import sys, cidboot.stage.pid1, {entry}, {ON_THE_WAY[entry]}; print('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bare = subprocess.run([sys.executable, "-I", "-c", "import sys; print('\\n'.join(sorted(sys.modules)))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120).stdout.split()
    loaded = set(proc.stdout.split()) - set(bare)  # not what the host's site (.pth files) imports
    early = sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_AT_START[entry]))
    assert not early, f"{entry} imports at start what only later paths need: {early}"


def test_firmware_start_imports_no_typing() -> None:
    """The firmware's whole path (pid1, the stage, netboot) imports no `typing`: its modules take
    their annotation types under TYPE_CHECKING (~9 ms of instructions under TCG at power-on).
    -S as /init runs (the host's site imports typing; the firmware needs no site-packages)."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import cidboot.stage.pid1, firmware.stage, firmware.netboot; "
            "print('typing' in sys.modules)")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
