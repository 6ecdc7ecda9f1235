"""Fail-closed #14: what a device may boot, on the host (TrustState, `imagebuilder verify`) and in
the bootstrap (NVRAM state, signed device registry).

Rollback used to be checked per manifest name only: any other unexpired signed name booted, and
the same version with different content was accepted. Now a device boots one name (its role's
manifest in the signed registry, else the name pinned in its trust state) and one CID per version.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bootstrap.stage.nvram import Nvram
from bootstrap.stage.verify import Refused, prepare
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.netboot.bootconfig import BootConfig
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.dice.derive import root_public_key_from_uds
from cidboot.trust.manifest import (
    Layer,
    Manifest,
    ManifestNameError,
    RegistryRollbackError,
    RollbackError,
    RootOfTrust,
    SignedManifest,
    TrustState,
    VersionConflictError,
    sign_manifest,
    verify_manifest,
)
from cidboot.trust.registry import sign_registry
from tests.support.gateway_fixtures import running_gateway
from tests.unit.test_bootstrap_stage import ANCHOR, K1, UDS, _firmware, _nvram, _store, _url

KEYS = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
ROOT = RootOfTrust.from_public_keys([k.public_key() for k in KEYS], threshold=1)
LAYER = Layer(CID.of(b"kernel", RAW), 6, "kernel")
NOW = int(time.time())


def signed(name: str = "hello", version: int = 1, cmdline: str = "") -> SignedManifest:
    return sign_manifest(Manifest(name, version, NOW + 3600, (LAYER,), ROOT, cmdline=cmdline), KEYS[:1])


# --- host side: cidboot.trust.manifest.TrustState (what `imagebuilder verify --state` uses) ---

def test_another_signed_manifest_name_is_refused_by_the_trust_state(tmp_path: Path) -> None:
    st = TrustState.load(tmp_path / "state.json", ROOT)
    verify_manifest(signed("hello", 3), st)
    reloaded = TrustState.load(tmp_path / "state.json", ROOT)
    assert reloaded.name == "hello"
    debug = signed("debug-shell", 1)  # signed, unexpired, another name: booted on main
    with pytest.raises(ManifestNameError, match="named 'debug-shell'; this device boots only 'hello'"):
        verify_manifest(debug, reloaded)
    assert TrustState.load(tmp_path / "state.json", ROOT).highest == {"hello": 3}  # nothing recorded


def test_expected_name_from_a_signed_source_decides_even_on_a_fresh_state(tmp_path: Path) -> None:
    with pytest.raises(ManifestNameError, match="from the device registry"):
        verify_manifest(signed("debug-shell"), TrustState(ROOT), expected_name="hello")
    st = TrustState.load(tmp_path / "state.json", ROOT)
    verify_manifest(signed("hello"), st)
    verify_manifest(signed("sensor", 1), st, expected_name="sensor")  # the registry moved the device
    assert TrustState.load(tmp_path / "state.json", ROOT).name == "sensor"


def test_same_version_different_cid_is_refused_by_the_trust_state(tmp_path: Path) -> None:
    st = TrustState.load(tmp_path / "state.json", ROOT)
    good = signed("hello", 5)
    verify_manifest(good, st)
    evil = signed("hello", 5, cmdline="init=/bin/sh")  # same name and version, other content
    with pytest.raises(VersionConflictError, match=f"is not {good.cid}"):
        verify_manifest(evil, TrustState.load(tmp_path / "state.json", ROOT))
    again = TrustState.load(tmp_path / "state.json", ROOT)
    verify_manifest(good, again)  # the same CID again is a reboot
    verify_manifest(signed("hello", 6, cmdline="init=/bin/sh"), again)  # a new version may change anything
    assert again.booted == {"hello": str(signed("hello", 6, cmdline="init=/bin/sh").cid)}


def test_state_from_before_names_and_cids_learns_them(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    p.write_text(json.dumps({"root": {"keys": [k.hex() for k in ROOT.keys], "threshold": 1, "version": 1},
                             "highest": {"hello": 2}}))  # what the state file held before this fix
    st = TrustState.load(p, ROOT)
    with pytest.raises(RollbackError):
        verify_manifest(signed("hello", 1), st)
    verify_manifest(signed("hello", 2), st)
    assert (st.name, st.booted) == ("hello", {"hello": str(signed("hello", 2).cid)})


def test_registry_replayed_at_an_older_version_is_refused() -> None:
    st = TrustState(ROOT)
    st.accept_registry(4)
    st.accept_registry(4)
    with pytest.raises(RegistryRollbackError, match="version 3 is older than version 4"):
        st.accept_registry(3)


# --- the bootstrap: NVRAM state and the signed device registry ---

def _publish(store: Blockstore, layers: tuple[Layer, ...], name: str, version: int = 1, cmdline: str = "") -> SignedManifest:
    m = Manifest(name, version, int(time.time()) + 3600, layers, ANCHOR, cmdline=cmdline)
    s = sign_manifest(m, [K1])
    store.put(s.cid, s.encode())
    return s


def _registry(store: Blockstore, role: str | None, manifests: dict[str, str], version: int | None = None) -> CID:
    """A registry holding the test device (the DICE root key of UDS) with `role`."""
    roots = DeviceRoots()
    roots.add(root_public_key_from_uds(UDS), "device-0", role)
    block = sign_registry(roots, [K1], manifests=manifests, version=version)
    return store.put_block(block, DAG_CBOR)


def _boot(tmp: Path, cid: CID, gw: object, *, registry: CID | None = None, role: str = "default",
          mode: str = "measured") -> SignedManifest:
    cfg = BootConfig(cid, (_url(gw),), role=role, device_registry=registry)
    raw = cfg.encode()
    _, dice = _firmware(raw)
    plan = prepare(cfg, raw, dice, boot_mode=mode, anchor=ANCHOR, nvram=Nvram(_nvram(tmp)),
                   store=Blockstore(tmp / f"dev-store-{time.monotonic_ns()}"), timeout=3,
                   carry_dice=mode == "measured")
    return SignedManifest(plan.manifest, b"")


def test_another_signed_manifest_name_is_refused_by_the_bootstrap(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    hello, debug = _publish(store, layers, "hello"), _publish(store, layers, "debug-shell", cmdline="init=/bin/sh")
    with running_gateway(store) as gw:
        _boot(tmp_path, hello.cid, gw)
        with pytest.raises(Refused) as e:
            _boot(tmp_path, debug.cid, gw)
    assert e.value.check == "manifest name"
    assert str(debug.cid) in e.value.detail and "'hello'" in e.value.detail
    st = Nvram(_nvram(tmp_path)).load_state(ANCHOR)
    assert st.highest == {"hello": 1} and st.name == "hello"


def test_same_version_different_cid_is_refused_by_the_bootstrap(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    good = _publish(store, layers, "hello", 2)
    evil = _publish(store, layers, "hello", 2, cmdline="init=/bin/sh")
    with running_gateway(store) as gw:
        _boot(tmp_path, good.cid, gw)
        with pytest.raises(Refused) as e:
            _boot(tmp_path, evil.cid, gw)
        _boot(tmp_path, good.cid, gw)  # a reboot of the same CID
    assert e.value.check == "rollback" and str(evil.cid) in e.value.detail and str(good.cid) in e.value.detail
    assert Nvram(_nvram(tmp_path)).load_state(ANCHOR).booted == {"hello": str(good.cid)}


def test_registry_role_manifest_decides_what_a_fresh_device_boots(tmp_path: Path) -> None:
    """With a signed registry the name is known before the first boot: a fresh device given
    another signed manifest is refused, its own role's manifest boots."""
    store, layers = _store(tmp_path)
    hello, debug = _publish(store, layers, "hello"), _publish(store, layers, "debug-shell")
    reg = _registry(store, "worker", {"worker": "hello", "other": "debug-shell"}, version=1)
    with running_gateway(store) as gw:
        with pytest.raises(Refused) as e:
            _boot(tmp_path, debug.cid, gw, registry=reg, role="worker")
        assert e.value.check == "manifest name" and "from the device registry" in e.value.detail
        assert Nvram(_nvram(tmp_path)).read() is None
        with pytest.raises(Refused) as e:  # the boot config cannot move a measured device to another role
            _boot(tmp_path, debug.cid, gw, registry=reg, role="other")
        assert e.value.check == "registry" and "registered as role 'worker'" in e.value.detail
        _boot(tmp_path, hello.cid, gw, registry=reg, role="worker")
    st = Nvram(_nvram(tmp_path)).load_state(ANCHOR)
    assert (st.name, st.registry) == ("hello", 1)


@pytest.mark.parametrize("role, manifests, message", [
    (None, {"worker": "hello"}, "has no role in the device registry"),
    ("worker", {"other": "hello"}, "names no manifest for role 'worker'"),
])
def test_registry_that_does_not_place_the_device_refuses_the_boot(tmp_path: Path, role: str | None,
                                                                   manifests: dict[str, str], message: str) -> None:
    store, layers = _store(tmp_path)
    hello = _publish(store, layers, "hello")
    reg = _registry(store, role, manifests)
    with running_gateway(store) as gw, pytest.raises(Refused) as e:
        _boot(tmp_path, hello.cid, gw, registry=reg, role="worker")
    assert e.value.check == "registry" and message in e.value.detail and str(reg) in e.value.detail


def test_older_registry_replayed_to_the_bootstrap_is_refused(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    hello = _publish(store, layers, "hello")
    new, old = (_registry(store, "worker", {"worker": "hello"}, version=v) for v in (2, 1))
    with running_gateway(store) as gw:
        _boot(tmp_path, hello.cid, gw, registry=new, role="worker")
        with pytest.raises(Refused) as e:
            _boot(tmp_path, hello.cid, gw, registry=old, role="worker")
    assert e.value.check == "registry" and "version 1 is older than version 2" in e.value.detail


def test_torn_nvram_write_still_boots_the_previous_state(tmp_path: Path) -> None:
    """Device level: the write of v3's state cut short (a sample of offsets) leaves v2's state,
    so v2 boots again and v1 is still a rollback."""
    store, layers = _store(tmp_path)
    v1, v2, v3 = (_publish(store, layers, "hello", v) for v in (1, 2, 3))
    nv = _nvram(tmp_path)
    with running_gateway(store) as gw:
        _boot(tmp_path, v1.cid, gw)
        _boot(tmp_path, v2.cid, gw)
        before = nv.read_bytes()
        _boot(tmp_path, v3.cid, gw)
        after = nv.read_bytes()
        changed = [i for i in range(len(after)) if after[i] != before[i]]
        for k in sorted({0, 1, 8, 47, 56, 57, (changed[-1] - changed[0]) // 2}):
            nv.write_bytes(after[:changed[0] + k] + before[changed[0] + k:])
            _boot(tmp_path, v2.cid, gw)  # boots: the previous state is read (and rewritten)
            nv.write_bytes(after[:changed[0] + k] + before[changed[0] + k:])
            with pytest.raises(Refused) as e:
                _boot(tmp_path, v1.cid, gw)
            assert e.value.check == "rollback", k


def test_unmeasured_boot_is_looked_up_by_the_boot_config_role(tmp_path: Path) -> None:
    """No DICE identity to look up: the boot config's role picks the manifest name among those
    the signed registry lists (the boot is unmeasured, so never affirming, docs/trust.md)."""
    store, layers = _store(tmp_path)
    hello, debug = _publish(store, layers, "hello"), _publish(store, layers, "debug-shell")
    reg = _registry(store, "worker", {"worker": "hello"})
    with running_gateway(store) as gw:
        with pytest.raises(Refused) as e:
            _boot(tmp_path, debug.cid, gw, registry=reg, role="worker", mode="unmeasured")
        assert e.value.check == "manifest name"
        _boot(tmp_path, hello.cid, gw, registry=reg, role="worker", mode="unmeasured")


def test_imagebuilder_verify_refuses_another_name_and_same_version_other_cid(tmp_path: Path) -> None:
    """`imagebuilder verify --state` applies the device's rules: the pinned (or --name) manifest
    name, and one CID per version."""
    from tests.unit.test_trust_cli import cli

    env = {"CIDBOOT_STORE": str(tmp_path / "store")}
    cli("imagebuilder", "keygen", "-o", str(tmp_path / "a"), env=env)
    cli("imagebuilder", "root", str(tmp_path / "a.pub"), "--threshold", "1", "-o", str(tmp_path / "root.json"), env=env)

    def sign(name: str, version: int, cmdline: str = "") -> str:
        (tmp_path / "m.yaml").write_text(f"name: {name}\nversion: {version}\nexpires: +1d\nroot: root.json\n"
                                         f"layers: []\ncmdline: '{cmdline}'\n")
        r = cli("imagebuilder", "sign", str(tmp_path / "m.yaml"), f"--key={tmp_path}/a.pem", env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def verify(cid: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return cli("imagebuilder", "verify", cid, "--root", str(tmp_path / "root.json"), "--state",
                   str(tmp_path / "state.json"), *extra, env=env)

    hello = sign("hello", 2)
    assert verify(hello).returncode == 0
    other = verify(sign("debug-shell", 9))
    assert other.returncode == 1 and "✗ ManifestNameError" in other.stdout, other.stdout
    same = verify(sign("hello", 2, "init=/bin/sh"))
    assert same.returncode == 1 and "✗ VersionConflictError" in same.stdout, same.stdout
    named = verify(hello, "--name", "sensor")
    assert named.returncode == 1 and "this device boots only 'sensor'" in named.stdout


def test_registry_lookup_imports_nothing_the_bootstrap_image_lacks() -> None:
    """The bootstrap now reaches cidboot.trust.registry (lazily): it must stay within stdlib + cbor2 +
    cryptography, like the rest of the stage."""
    import re
    import sys

    code = "import sys, bootstrap.stage.verify, cidboot.trust.registry; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    top = set(re.findall(r"'([^']+)'", out))
    assert not top & {"yaml", "scapy", "tftpy", "ipfshttpclient", "pyroute2", "jsonschema", "elftools"}, top
