"""The L1 bootstrap image booted under QEMU (TCG) in a network namespace, as the firmware would
start it: -kernel/-initrd with a hand-off cpio appended (CDI_1 from a software DICE derivation and
the boot config), a 1 MiB NVRAM disk on virtio-blk, and the real boot server's gateway serving the
hello image. The bootstrap fetches, verifies, measures and kexecs into hello; the wall time of
every step (from the console, timestamped here) is printed.

Neither the signing keys nor the trust anchor are in the repository: the fixtures copy the flow
directories, generate keys, build hello first and give the bootstrap hello's root as its anchor.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootstrap.stage.nvram import Nvram
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.exporter import export_file
from cidboot.netboot.bootconfig import BootConfig
from cidboot.stage.handoff import Handoff
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.dice import DiceInputs, DiceMode, encode_handover
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.manifest import Manifest, RootOfTrust, SignedManifest
from cidboot.trust.measure import boot_code_hash, code_hash_of_blobs, served_initrds

pytestmark = [pytest.mark.qemu, pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:12:34:56"
UDS = bytes(range(32))
GATEWAY = "http://10.77.0.1:8080"  # the boot server's gateway on br0 (tests/support/boot_network.py)


def _build(flow: Path, store: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", "--store", str(store)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def _parts(store: Path, cid: str) -> tuple[Manifest, dict[str, bytes]]:
    bs = Blockstore(store)
    m = SignedManifest.decode(bs.get(CID.parse(cid))).manifest
    return m, {lyr.role: b"".join(export_file(lyr.cid, bs.get)) for lyr in m.layers}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """hello (into the store the boot server serves) and the bootstrap trusting hello's root."""
    base = tmp_path_factory.mktemp("bsq")
    t = time.monotonic()
    hello = base / "hello"
    shutil.copytree(REPO / "examples/hello", hello, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    keys.write_keypair(keys.generate(), hello / "keys/signer-1")
    store = base / "served-store"
    res = _build(hello / "flow.yaml", store)
    hello_m, _ = _parts(store, str(res["manifest"]))
    bs_dir = base / "bootstrap"
    shutil.copytree(REPO / "bootstrap/image", bs_dir,
                    ignore=shutil.ignore_patterns("keys", "trust-anchor.json", "__pycache__", ".gitignore"))
    keys.write_keypair(keys.generate(), bs_dir / "keys/signer-1")
    keys.write_root(hello_m.root, bs_dir / "trust-anchor.json")
    bres = _build(bs_dir / "flow.yaml", base / "bs-store")
    bm, parts = _parts(base / "bs-store", str(bres["manifest"]))
    layers = [parts[lyr.role] for lyr in bm.layers if lyr.role != "kernel"]
    initrd = b"".join(layers)
    # the reference: over the kernel and each initrd boot.ipxe lists (the runtime layer, then the rest)
    assert bm.measurements["bootstrap"] == boot_code_hash(parts["kernel"], served_initrds(layers))
    return {"kernel": parts["kernel"], "initrd": initrd, "initrds": served_initrds(layers), "store": store,
            "manifest": str(res["manifest"]), "build_s": time.monotonic() - t}


POWER_DOWN = r"reboot: Power down"
LIAR = "http://10.77.0.1:8081"  # tests/support/tampering_gateway.py, started in the namespace when asked


def _boot(tmp: Path, images: dict[str, object], bootconfig: bytes, *, until: str, timeout: float = 420,
          lie_about: str | None = None) -> tuple[str, list[tuple[float, str]]]:
    from tests.support.boot_network import boot_until, running_boot_server

    kernel, initrd = images["kernel"], images["initrd"]
    assert isinstance(kernel, bytes) and isinstance(initrd, bytes)
    fw = DiceInputs(code_hash=code_hash_of_blobs([b"firmware stand-in"]), mode=DiceMode.NORMAL)
    initrds = images["initrds"]
    assert isinstance(initrds, list)
    l1 = DiceInputs(code_hash=boot_code_hash(kernel, initrds), config_value=None, config_descriptor=bootconfig,
                    mode=DiceMode.NORMAL)
    ident = derive_layers(UDS, [fw, l1])
    handoff = Handoff(encode_handover(ident.cdi_attest, ident.cdi_seal, ident.chain),
                      {"boot_mode": "measured", "bootconfig": bootconfig.decode()})
    nvram = tmp / "nvram.img"
    if not nvram.exists():
        nvram.write_bytes(bytes(1 << 20))
    store = images["store"]
    assert isinstance(store, Path)
    shutil.copytree(store, tmp / "store", dirs_exist_ok=True)  # running_boot_server serves tmp/store
    with running_boot_server(tmp) as srv:
        liar = None
        if lie_about is not None:
            liar = srv.net.popen([sys.executable, "-m", "tests.support.tampering_gateway", "--upstream", GATEWAY,
                                  "--listen", LIAR.removeprefix("http://"), "--tamper", lie_about],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert liar.stdout is not None and "tampering gateway" in liar.stdout.readline()
        try:
            console, lines = boot_until(tmp, srv.net, until=until, timeout=timeout, kernel=kernel,
                                        initrd=handoff.append_to(initrd), disk=nvram, mac=MAC)
        finally:
            if liar is not None:
                liar.kill()
                liar.wait()
    return console, lines


def _at(lines: list[tuple[float, str]], pattern: str) -> float | None:
    return next((t for t, line in lines if re.search(pattern, line)), None)


def test_bootstrap_verifies_measures_and_kexecs_into_hello(images: dict[str, object], tmp_path: Path) -> None:
    cid = str(images["manifest"])
    cfg = BootConfig(CID.parse(cid), (GATEWAY,)).encode()
    console, lines = _boot(tmp_path, images, cfg, until=r"cidboot-stage: agent start|cidboot: refused")
    tail = console[-4000:]
    assert "cidboot-stage: bootstrap start mode=measured" in console, tail
    assert f"cidboot-stage: bootstrap handover manifest={cid}" in console, tail
    assert "cidboot: refused" not in console, tail
    assert "Kernel panic" not in console, tail
    # the rollback state reached the NVRAM disk
    state = Nvram(tmp_path / "nvram.img").load_state(_anchor_of(images))
    assert state.highest == {"hello": 1}
    marks = {
        "bootstrap start": _at(lines, r"cidboot-stage: bootstrap start"),
        "bootstrap handover": _at(lines, r"cidboot-stage: bootstrap handover"),
        "hello agent start": _at(lines, r"cidboot-stage: agent start"),
            }
    detail = next((line for _, line in lines if line.startswith("cidboot: bootstrap: manifest=")), "")
    print(f"\nimages built in {images['build_s']:.1f} s; console marks (s since power-on): "
          + ", ".join(f"{k} {v:.2f}" for k, v in marks.items() if v is not None) + f"\n{detail}")
    assert marks["hello agent start"] is not None, tail  # kexec worked: hello's own /init ran its stage


def _manifest_of(images: dict[str, object]) -> Manifest:
    store = images["store"]
    assert isinstance(store, Path)
    return SignedManifest.decode(Blockstore(store).get(CID.parse(str(images["manifest"])))).manifest


def _anchor_of(images: dict[str, object]) -> RootOfTrust:
    return _manifest_of(images).root


def test_bootstrap_refuses_an_unknown_manifest_and_powers_off(images: dict[str, object], tmp_path: Path) -> None:
    missing = "bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    console, _ = _boot(tmp_path, images, BootConfig(CID.parse(missing), (GATEWAY,)).encode(), until=POWER_DOWN, timeout=300)
    assert re.search(rf"cidboot: refused: manifest {missing}: unavailable", console), console[-3000:]
    assert "cidboot-stage: bootstrap handover" not in console
    assert "reboot: Power down" in console and "Kernel panic" not in console


def test_bootstrap_refuses_a_tampered_layer_and_powers_off(images: dict[str, object], tmp_path: Path) -> None:
    """The only gateway flips a byte of one layer (the config layer, fetched last): the console
    names that layer's CID, nothing is kexec'ed and the rollback state is not advanced."""
    cid = str(images["manifest"])
    m = _manifest_of(images)
    bad = str(m.layers[-1].cid)
    console, lines = _boot(tmp_path, images, BootConfig(CID.parse(cid), (LIAR,)).encode(), until=POWER_DOWN, timeout=300,
                           lie_about=bad)
    assert re.search(rf"cidboot: refused: layer {bad}: hash mismatch", console), console[-3000:]
    assert "cidboot-stage: bootstrap handover" not in console and "cidboot-stage: agent start" not in console
    assert "reboot: Power down" in console and "Kernel panic" not in console
    assert Nvram(tmp_path / "nvram.img").read() is None  # nothing accepted, nothing persisted
    print(f"\ntampered layer refused at {_at(lines, 'cidboot: refused'):.2f} s since QEMU start")


def test_bootstrap_refuses_a_corrupted_nvram(images: dict[str, object], tmp_path: Path) -> None:
    """Damaged rollback state on the virtio-blk disk is refused with a clear message, never reset."""
    cid = str(images["manifest"])
    junk = b"CIDBNVR\0" + bytes(40) + b"scribbled"
    (tmp_path / "nvram.img").write_bytes(junk + bytes((1 << 20) - len(junk)))
    console, _ = _boot(tmp_path, images, BootConfig(CID.parse(cid), (GATEWAY,)).encode(), until=POWER_DOWN, timeout=300)
    assert re.search(rf"cidboot: refused: nvram: /dev/vda: .*manifest {cid}", console), console[-3000:]
    assert "cidboot-stage: bootstrap handover" not in console
    assert (tmp_path / "nvram.img").read_bytes()[:len(junk)] == junk  # left as found


def test_ipxe_boots_the_bootstrap_unmeasured_into_hello(images: dict[str, object], tmp_path: Path) -> None:
    """A plain iPXE ROM (QEMU's, PXE over the boot server) boots the bootstrap: no hand-off, so the
    boot config comes over TFTP from the command line boot.ipxe gives, and the boot is unmeasured."""
    from qemu.harness.netns import boot_network
    from tests.support.boot_network import boot_until

    kernel, initrd, store = images["kernel"], images["initrd"], images["store"]
    assert isinstance(kernel, bytes) and isinstance(initrd, bytes) and isinstance(store, Path)
    cid = str(images["manifest"])
    tftp = tmp_path / "tftp"
    (tftp / "bootstrap").mkdir(parents=True)
    (tftp / "bootstrap/vmlinuz").write_bytes(kernel)
    (tftp / "bootstrap/initrd.img").write_bytes(initrd)
    nvram = tmp_path / "nvram.img"
    nvram.write_bytes(bytes(1 << 20))
    with boot_network(taps=1) as net:
        with open(tmp_path / "server.log", "w") as logf:
            srv = net.popen([sys.executable, "-m", "bootstrap", "serve", "--interface", "br0", "--dhcp-range",
                             "10.77.0.100-10.77.0.119", "--store", str(store), "--manifest", cid, "--tftp-root", str(tftp),
                             "--state-dir", str(tmp_path / "state")], stdout=subprocess.PIPE, stderr=logf, text=True)
        try:
            assert srv.stdout is not None and "serving on br0" in srv.stdout.readline()
            console, lines = boot_until(tmp_path, net, until=r"cidboot-stage: agent start|cidboot: refused",
                                        timeout=600, disk=nvram, mac=MAC, boot_from_network=True)
        finally:
            srv.terminate()
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
    tail = console[-4000:]
    assert "cidboot-stage: bootstrap start mode=unmeasured" in console, tail
    assert f"cidboot-stage: bootstrap handover manifest={cid}" in console, tail
    assert "cidboot-stage: agent start" in console, tail
    marks = {"iPXE script": _at(lines, r"cidboot: booting the bootstrap"),
             "bootstrap start": _at(lines, r"cidboot-stage: bootstrap start"),
             "bootstrap handover": _at(lines, r"cidboot-stage: bootstrap handover"),
             "hello agent start": _at(lines, r"cidboot-stage: agent start")}
    print("\niPXE (unmeasured) console marks (s since power-on): "
          + ", ".join(f"{k} {v:.2f}" for k, v in marks.items() if v is not None))
    assert Nvram(nvram).load_state(_anchor_of(images)).highest == {"hello": 1}
