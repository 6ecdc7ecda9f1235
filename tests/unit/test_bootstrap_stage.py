"""The L1 bootstrap stage on the host (bootstrap.stage): a small fake image (blobs imported with
cidboot.ipld.unixfs, manifest signed with cidboot.trust.manifest.sign_manifest) served by real gateways on
loopback; DICE CDI_1 from a software derivation standing in for the firmware; rollback state
in an NVRAM file kept between runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bootstrap.stage import main as stage_main
from bootstrap.stage.nvram import Nvram
from bootstrap.stage.verify import BootPlan, Refused, prepare
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.importer import ImportOptions, import_bytes
from cidboot.netboot.bootconfig import BootConfig
from cidboot.netboot.tftp_client import TftpError, get_url
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import key_id
from cidboot.trust.dice import DiceInputs, DiceMode, decode_handover, encode_handover, verify_chain
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.measure import image_inputs
from tests.support.gateway_fixtures import proxy_gateway, running_gateway

UDS = bytes(range(32))
K1 = keys.generate()
EVIL = keys.generate()
ANCHOR = RootOfTrust.from_public_keys([K1.public_key()], 1)
BLOBS = {"kernel": os.urandom(5000), "runtime": os.urandom(3000), "agent": os.urandom(2100), "config": b"cfg" * 100}
OPTS = ImportOptions(cid_version=1, chunk_size=1024)


def _store(tmp: Path) -> tuple[Blockstore, tuple[Layer, ...]]:
    store = Blockstore(tmp / "server-store")
    layers = tuple(Layer(import_bytes(data, store, OPTS).cid, len(data), role) for role, data in BLOBS.items())
    return store, layers


def _publish(store: Blockstore, layers: tuple[Layer, ...], *, version: int = 1, signer: PrivateKey = K1,
             root: RootOfTrust = ANCHOR, expires: int | None = None) -> SignedManifest:
    m = Manifest("hello", version, expires if expires is not None else int(time.time()) + 3600, layers, root,
                 cmdline="console=ttyS0 quiet")
    signed = sign_manifest(m, [signer])
    store.put(signed.cid, signed.encode())
    return signed


def _firmware(config_raw: bytes) -> tuple[list[DiceInputs], bytes]:
    """What the firmware would hand over: CDI_1 and [root, cert L0, cert L1]."""
    inputs = [DiceInputs(code_hash=hashlib.sha512(b"firmware").digest(), mode=DiceMode.NORMAL),
              DiceInputs(code_hash=hashlib.sha512(b"bootstrap").digest(), config_value=None,
                         config_descriptor=config_raw, mode=DiceMode.NORMAL)]
    ident = derive_layers(UDS, inputs)
    return inputs, encode_handover(ident.cdi_attest, ident.cdi_seal, ident.chain)


def _url(gw: object) -> str:
    return f"http://127.0.0.1:{gw.server_address[1]}"  # type: ignore[attr-defined]


def _run(tmp: Path, cid: CID, gateways: list[str], *, nvram: Path | None = None) -> tuple[BootPlan, list[DiceInputs]]:
    cfg = BootConfig(cid, tuple(gateways))
    raw = cfg.encode()
    inputs, dice = _firmware(raw)
    nv = nvram or _nvram(tmp)
    plan = prepare(cfg, raw, dice, boot_mode="measured", anchor=ANCHOR, nvram=Nvram(nv),
                   store=Blockstore(tmp / f"dev-store-{time.monotonic_ns()}"), timeout=3)
    return plan, inputs


def _nvram(tmp: Path) -> Path:
    p = tmp / "nvram.img"
    if not p.exists():
        p.write_bytes(bytes(1 << 20))
    return p


def test_good_image_gives_a_plan_whose_chain_matches_the_software_derivation(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    with running_gateway(store) as gw:
        plan, inputs = _run(tmp_path, signed.cid, [_url(gw)])
    assert plan.kernel == BLOBS["kernel"]
    assert plan.initrd == BLOBS["runtime"] + BLOBS["agent"] + BLOBS["config"]
    assert plan.cmdline == "console=ttyS0 quiet"
    assert plan.signers == [key_id(K1.public_key())]
    h = plan.handoff
    assert h.boot["boot_mode"] == "measured" and h.boot["manifest"] == str(signed.cid)
    assert BootConfig.decode(h.boot["bootconfig"].encode()).manifest == signed.cid
    assert h.dice is not None
    got = decode_handover(h.dice)
    want = derive_layers(UDS, [*inputs, image_inputs(signed.cid, signed.manifest, [key_id(K1.public_key())])])
    assert (got.cdi_attest, got.cdi_seal, got.chain) == (want.cdi_attest, want.cdi_seal, want.chain)
    chain = verify_chain(got.chain)
    assert len(chain.entries) == 3
    assert h.to_cpio()  # a valid hand-off for the image
    # the accepted version is now in NVRAM
    assert Nvram(_nvram(tmp_path)).load_state(ANCHOR).highest == {"hello": 1}


def test_tampered_layer_is_refused_naming_its_cid(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    bad = layers[1].cid

    def mangle(path: str, body: bytes) -> bytes:
        return body[:-1] + bytes([body[-1] ^ 0xFF]) if str(bad) in path else body

    with running_gateway(store) as gw, proxy_gateway(_url(gw), mangle) as lying:
        with pytest.raises(Refused) as e:
            _run(tmp_path, signed.cid, [lying])
    assert e.value.check == f"layer {bad}"
    assert str(e.value).startswith(f"layer {bad}: hash mismatch")
    assert Nvram(_nvram(tmp_path)).read() is None  # nothing accepted, nothing persisted


def test_first_gateway_down_or_lying_falls_back_to_the_second(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)

    def mangle(path: str, body: bytes) -> bytes:  # lies about every block, the manifest included
        return body[:-1] + bytes([body[-1] ^ 1])

    with running_gateway(store) as gw, proxy_gateway(_url(gw), mangle) as lying:
        plan, _ = _run(tmp_path, signed.cid, ["http://127.0.0.1:1", _url(gw)])
        assert plan.kernel == BLOBS["kernel"]
        plan, _ = _run(tmp_path, signed.cid, [lying, _url(gw)])
        assert plan.initrd == BLOBS["runtime"] + BLOBS["agent"] + BLOBS["config"]


@pytest.mark.parametrize("claimed_root", ["anchor", "own"])
def test_unknown_signing_key_is_refused(tmp_path: Path, claimed_root: str) -> None:
    store, layers = _store(tmp_path)
    root = ANCHOR if claimed_root == "anchor" else RootOfTrust.from_public_keys([EVIL.public_key()], 1)
    signed = _publish(store, layers, signer=EVIL, root=root)
    with running_gateway(store) as gw, pytest.raises(Refused) as e:
        _run(tmp_path, signed.cid, [_url(gw)])
    kid = key_id(EVIL.public_key()).hex()
    assert str(e.value).startswith(f"manifest {signed.cid}: signed by unknown key {kid} (not in the trust anchor)")


def test_rollback_is_refused_across_runs(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    v2 = _publish(store, layers, version=2)
    v1 = _publish(store, layers, version=1)
    nv = _nvram(tmp_path)
    with running_gateway(store) as gw:
        _run(tmp_path, v2.cid, [_url(gw)], nvram=nv)
        with pytest.raises(Refused) as e:
            _run(tmp_path, v1.cid, [_url(gw)], nvram=nv)
        assert str(e.value) == f"rollback: manifest {v1.cid} (hello) version 1 < 2 already booted"
        _run(tmp_path, v2.cid, [_url(gw)], nvram=nv)  # the same version again is fine


def test_expired_manifest_is_refused(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers, expires=int(time.time()) - 10)
    with running_gateway(store) as gw, pytest.raises(Refused) as e:
        _run(tmp_path, signed.cid, [_url(gw)])
    assert e.value.check == "expiry" and str(signed.cid) in e.value.detail


def test_corrupted_nvram_is_refused_clearly(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    nv = _nvram(tmp_path)
    with running_gateway(store) as gw:
        _run(tmp_path, signed.cid, [_url(gw)], nvram=nv)
        raw = bytearray(nv.read_bytes())
        raw[60] ^= 0x20
        nv.write_bytes(bytes(raw))
        with pytest.raises(Refused) as e:
            _run(tmp_path, signed.cid, [_url(gw)], nvram=nv)
    assert e.value.check == "nvram"
    assert "checksum mismatch" in e.value.detail and str(signed.cid) in e.value.detail


def test_manifest_unavailable_everywhere_is_refused(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    with pytest.raises(Refused, match=rf"manifest {signed.cid}: unavailable"):
        _run(tmp_path, signed.cid, ["http://127.0.0.1:1"])


@contextmanager
def _tftp_server(root: Path) -> Iterator[int]:
    import socket

    import tftpy

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = tftpy.TftpServer(str(root))
    t = threading.Thread(target=srv.listen, args=("127.0.0.1", port), daemon=True)
    t.start()
    time.sleep(0.3)
    try:
        yield port
    finally:
        srv.stop(now=True)
        t.join(1)  # a daemon thread; tftpy may sit out its session timeout after the last ACK


def test_tftp_get(tmp_path: Path) -> None:
    """The bootstrap's boot config comes through cidboot.netboot.tftp_client (the firmware's client), here
    against another server (tftpy), by URL as the command line gives it."""
    (tmp_path / "a.bin").write_bytes(os.urandom(1300))
    (tmp_path / "b.bin").write_bytes(os.urandom(1024))  # a multiple of 512: ends with an empty block
    with _tftp_server(tmp_path) as port:
        assert get_url(f"tftp://127.0.0.1:{port}/a.bin") == (tmp_path / "a.bin").read_bytes()
        assert get_url(f"tftp://127.0.0.1:{port}/b.bin", options=False) == (tmp_path / "b.bin").read_bytes()
        with pytest.raises(TftpError, match="server error 1"):
            get_url(f"tftp://127.0.0.1:{port}/missing.bin")
        with pytest.raises(TftpError, match="more than 1000 bytes"):
            get_url(f"tftp://127.0.0.1:{port}/a.bin", max_size=1000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers (no port race)
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(TftpError, match="no answer"):
            get_url(f"tftp://127.0.0.1:{silent.getsockname()[1]}/a.bin", timeout=0.1, retries=2)
    for bad in ("http://127.0.0.1/a.bin", "tftp://127.0.0.1/", "tftp://127.0.0.1:99999/a"):
        with pytest.raises(TftpError):
            get_url(bad)


def test_unmeasured_boot_fetches_its_config_over_tftp(tmp_path: Path) -> None:
    """No hand-off (iPXE booted us): boot config over TFTP from the command line, an ephemeral
    identity, boot_mode unmeasured in the hand-off."""
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    guest = tmp_path / "guest"
    guest.mkdir()
    start = stage_main.read_start(guest)
    assert start.boot_mode == "unmeasured" and start.bootconfig is None and start.dice is not None
    assert len(verify_chain(decode_handover(bytes(start.dice)).chain).entries) == 0  # one-entry chain
    tftp_root = tmp_path / "tftp"
    (tftp_root / "bootconfig").mkdir(parents=True)
    anchor = tmp_path / "trust-anchor.json"
    keys.write_root(ANCHOR, anchor)
    with running_gateway(store) as gw, _tftp_server(tftp_root) as port:
        (tftp_root / "bootconfig/52-54-00-12-34-56.json").write_bytes(BootConfig(signed.cid, (_url(gw),)).encode())
        cmdline = tmp_path / "cmdline"
        cmdline.write_text(f"cidboot.config=tftp://127.0.0.1:{port}/bootconfig/52-54-00-12-34-56.json console=ttyS0\n")
        plan, cfg = stage_main.attempt(start, anchor_path=anchor, nvram_path=_nvram(tmp_path),
                                       store_dir=tmp_path / "dev-store", cmdline_path=cmdline, network=False)
    assert cfg.manifest == signed.cid
    assert plan.handoff.boot["boot_mode"] == "unmeasured" and plan.handoff.dice is None
    assert plan.kernel == BLOBS["kernel"]


def test_measured_start_reads_and_erases_the_handoff(tmp_path: Path) -> None:
    from cidboot.stage.handoff import Handoff

    cfg_raw = BootConfig(CID.parse("bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"), ("http://x",)).encode()
    _, dice = _firmware(cfg_raw)
    arch = Handoff(dice, {"boot_mode": "measured", "bootconfig": cfg_raw.decode()}).to_cpio()
    import stat

    from cidboot.stage.cpio import iter_newc

    for member, data in iter_newc(arch):
        p = tmp_path / member.path
        if stat.S_ISDIR(member.mode):
            p.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISREG(member.mode):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    start = stage_main.read_start(tmp_path)
    assert start.boot_mode == "measured" and start.bootconfig == cfg_raw and bytes(start.dice or b"") == dice
    assert not (tmp_path / "run/cidboot/dice.cbor").exists()


def test_stage_imports_nothing_the_image_lacks() -> None:
    """The bootstrap image carries stdlib + cbor2 + cryptography only: no PyYAML, scapy, tftpy,
    ipfshttpclient, pyroute2 or jsonschema may be reached from the stage's entry."""
    import subprocess
    import sys

    code = ("import sys, bootstrap.stage.main, cidboot.netboot.tftp_client, cidboot.stage.kexec, cidboot.netboot.netif, "
            "cidboot.netboot.dhcp_client, cidboot.store.gateway.client, cidboot.ipld.unixfs.exporter; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    top = set(re.findall(r"'([^']+)'", out))
    assert not top & {"yaml", "scapy", "tftpy", "ipfshttpclient", "pyroute2", "jsonschema", "elftools"}, top


class _Stop(Exception):
    pass


def _main_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfg_raw: bytes) -> tuple[dict[str, object], list[tuple[Any, ...]]]:
    """A measured hand-off under a fake root, and main()'s PID-1 actions (network, kexec, power
    off) replaced by recorders."""
    from cidboot.stage import kexec
    from cidboot.stage.handoff import Handoff, canonical_json

    _, dice = _firmware(cfg_raw)
    guest = tmp_path / "guest"
    (guest / "run/cidboot").mkdir(parents=True)
    h = Handoff(dice, {"boot_mode": "measured", "bootconfig": cfg_raw.decode()})
    (guest / "run/cidboot/dice.cbor").write_bytes(dice)
    h.validate()
    (guest / "run/cidboot/boot.json").write_bytes(canonical_json(h.boot))
    anchor = tmp_path / "trust-anchor.json"
    keys.write_root(ANCHOR, anchor)
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(stage_main, "network_up", lambda start: ("10.0.0.2", None))
    monkeypatch.setattr(stage_main.pid1, "power_off", lambda reason="": calls.append(("power_off", reason)))
    monkeypatch.setattr(kexec, "kexec_boot", lambda k, i, c: calls.append(("kexec", k, i, c)))
    kw: dict[str, object] = {"root": guest, "anchor_path": anchor, "nvram_path": _nvram(tmp_path),
                             "store_dir": tmp_path / "dev-store", "cmdline_path": tmp_path / "no-cmdline"}
    return kw, calls


def test_main_kexecs_verified_image_with_handoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    with running_gateway(store) as gw:
        kw, calls = _main_env(tmp_path, monkeypatch, BootConfig(signed.cid, (_url(gw),)).encode())
        stage_main.main(**kw)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "cidboot-stage: bootstrap start mode=measured\n" in out
    assert f"cidboot-stage: bootstrap handover manifest={signed.cid}\n" in out
    assert len(calls) == 2 and calls[0][0] == "kexec", calls
    _, kernel, initrd, cmdline = calls[0]
    assert kernel == BLOBS["kernel"] and cmdline == "console=ttyS0 quiet"
    body = BLOBS["runtime"] + BLOBS["agent"] + BLOBS["config"]
    assert initrd.startswith(body) and b"run/cidboot/dice.cbor" in initrd[len(body):]
    assert calls[1] == ("power_off", "kexec returned")  # only reached because kexec is faked here


def test_main_refuses_then_powers_off_or_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers, signer=EVIL)
    with running_gateway(store) as gw:
        kw, calls = _main_env(tmp_path, monkeypatch, BootConfig(signed.cid, (_url(gw),)).encode())
        stage_main.main(**kw)  # type: ignore[arg-type]
        out = capsys.readouterr().out
        assert f"cidboot: refused: manifest {signed.cid}: signed by unknown key " in out
        assert calls == [("power_off", "")]
        assert "handover" not in out

        sleeps: list[float] = []

        def sleep(s: float) -> None:
            sleeps.append(s)
            if len(sleeps) == 2:
                raise _Stop

        monkeypatch.setattr(stage_main.time, "sleep", sleep)
        kw, calls = _main_env(tmp_path / "r", monkeypatch,
                              BootConfig(signed.cid, (_url(gw),), on_failure="retry").encode())
        with pytest.raises(_Stop):
            stage_main.main(**kw)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert out.count("cidboot: refused: manifest") == 2 and sleeps == [stage_main.RETRY_PAUSE] * 2
    assert calls == []


def test_console_check_names_and_config_url() -> None:
    from cidboot.netboot.dhcp_client import DhcpClientError

    assert stage_main.describe(Refused("layer bafyx", "hash mismatch")) == "layer bafyx: hash mismatch"
    assert stage_main.describe(DhcpClientError("no OFFER")) == "network: DhcpClientError: no OFFER"
    assert stage_main.describe(OSError("boom")) == "bootstrap: OSError: boom"
    assert stage_main.config_url("quiet cidboot.config=tftp://10.0.0.1/b.json x=1") == "tftp://10.0.0.1/b.json"
    assert stage_main.config_url("quiet") is None


def test_main_fails_closed_on_an_unexpected_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A bug or an exception nobody anticipated is still a console refusal and a power-off, and
    the CDI_1 copy is zeroed: nothing is kexec'ed."""
    cid = CID.parse("bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
    kw, calls = _main_env(tmp_path, monkeypatch, BootConfig(cid, ("http://127.0.0.1:1",)).encode())
    seen: list[bytearray] = []

    def boom(start: stage_main.Start, **_: object) -> None:
        seen.append(start.dice or bytearray())
        raise ValueError("unexpected")

    monkeypatch.setattr(stage_main, "attempt", boom)
    stage_main.main(**kw)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "cidboot: refused: bootstrap: ValueError: unexpected\n" in out
    assert calls == [("power_off", "")]
    assert seen and seen[0] == bytearray(len(seen[0]))  # CDI_1 handover zeroed before power-off


def _run_reusing(tmp: Path, cid: CID, gateways: list[str], running: CID | None, running_cmdline: str, *,
                 runtime: Any = None) -> BootPlan:
    """`prepare` as a measured bootstrap running the kernel `running` (its layer CID) with
    `running_cmdline` in effect and `runtime` (a switch_root.Runtime) as its own runtime.json."""
    from cidboot.store.blockstore import MemoryBlockstore

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = BootConfig(cid, tuple(gateways))
    raw = cfg.encode()
    _inputs, dice = _firmware(raw)
    return prepare(cfg, raw, dice, boot_mode="measured", anchor=ANCHOR, nvram=Nvram(_nvram(tmp)),
                   store=MemoryBlockstore(), timeout=3, running_kernel=running, running_cmdline=running_cmdline,
                   running_runtime=runtime)


def _assert_same_cdi_2(plan: BootPlan, full: BootPlan) -> None:
    """A plan that left a running layer unfetched hands on the CDI_2 a plan with every layer fetched does."""
    assert plan.handoff.dice is not None and full.handoff.dice is not None
    mine, theirs = decode_handover(plan.handoff.dice), decode_handover(full.handoff.dice)
    assert (mine.cdi_attest, mine.cdi_seal) == (theirs.cdi_attest, theirs.cdi_seal)


def test_the_running_kernel_layer_is_not_fetched_and_the_measurement_is_the_same(tmp_path: Path) -> None:
    """Same kernel CID and its parameters in effect: only the kernel layer's root block is
    fetched (its size checked), the plan has no kernel bytes, and CDI_2 is what a plan with
    the kernel fetched gets (the measurement covers the manifest, which names the CID)."""
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    kernel = layers[0].cid
    paths: list[str] = []

    def record(path: str, body: bytes) -> bytes:
        paths.append(path)
        return body

    with running_gateway(store) as gw, proxy_gateway(_url(gw), record) as counted:
        plan = _run_reusing(tmp_path / "a", signed.cid, [counted], kernel, "console=ttyS0 quiet root=x")
        kernel_requests = [p for p in paths if str(kernel) in p]
        full = _run_reusing(tmp_path / "b", signed.cid, [counted], None, "console=ttyS0 quiet")
    assert plan.kernel is None and plan.kernel_cid == kernel
    assert kernel_requests == [f"/ipfs/{kernel}?format=raw"]
    assert plan.initrd == full.initrd and full.kernel == BLOBS["kernel"]
    _assert_same_cdi_2(plan, full)


def test_the_kernel_is_fetched_when_the_cid_or_the_parameters_differ(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    with running_gateway(store) as gw:
        other = _run_reusing(tmp_path / "a", signed.cid, [_url(gw)], layers[1].cid, "console=ttyS0 quiet")
        params = _run_reusing(tmp_path / "b", signed.cid, [_url(gw)], layers[0].cid, "console=ttyS0")
    assert other.kernel == BLOBS["kernel"] and params.kernel == BLOBS["kernel"]


def test_a_running_kernel_layer_whose_declared_size_is_not_the_manifests_is_refused(tmp_path: Path) -> None:
    store, layers = _store(tmp_path)
    wrong = (Layer(layers[0].cid, layers[0].size + 1, "kernel"), *layers[1:])
    signed = _publish(store, wrong)
    with running_gateway(store) as gw, pytest.raises(Refused, match=str(layers[0].cid)):
        _run_reusing(tmp_path, signed.cid, [_url(gw)], layers[0].cid, "console=ttyS0 quiet")


def test_running_kernel_cid_file(tmp_path: Path) -> None:
    from bootstrap.stage.verify import running_kernel_cid

    f = tmp_path / "kernel.cid"
    assert running_kernel_cid(f) is None
    f.write_text("not a cid\n")
    assert running_kernel_cid(f) is None
    cid = CID.of(b"k")
    f.write_text(f"{cid}\n")
    assert running_kernel_cid(f) == cid


class _FakeTpm:
    """Just enough TPM for bootstrap.stage.tpm's control flow (the real commands run against
    swtpm in tests/integration/test_tpm_device_integration.py): PCRs, extend, a PCR-keyed HMAC, an AK."""

    def __init__(self) -> None:
        import hashlib

        self.pcrs = {i: bytes(32) for i in range(24)}
        self.pcrs[4] = hashlib.sha256(b"the UKI").digest()
        self.ak = (Path(__file__).parents[1] / "vectors/tpm/rsassa-ak.pub").read_bytes()

    def __enter__(self) -> _FakeTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def pcr_values(self, pcrs: Any) -> dict[int, bytes]:
        return {i: self.pcrs[i] for i in pcrs}

    def cdi(self, label: bytes, pcrs: Any) -> bytes:
        import hashlib
        import hmac

        return hmac.new(b"seed" + b"".join(self.pcrs[i] for i in sorted(pcrs)), label, hashlib.sha256).digest()

    def extend(self, pcr: int, data: bytes, banks: Any) -> dict[int, bytes]:
        import hashlib

        d = hashlib.sha256(data).digest()
        self.pcrs[pcr] = hashlib.sha256(self.pcrs[pcr] + d).digest()
        return {0x000B: d}

    def read_public(self, handle: int) -> bytes:
        return self.ak


def test_a_tpm_boot_derives_cdi1_from_the_tpm_and_hands_on_its_pcr15_events(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No hand-off, but a TPM and a firmware event log: read_start says measured with a TPM root
    (CDI_1 from the TPM, chain [L1 key]); after the image verified, attempt() extends PCR 15 with
    exactly the manifest's reference events and boot.json carries the log and the events; the
    hand-off carries CDI_2 (dice.cbor) like any measured boot."""
    from bootstrap.stage import tpm as stage_tpm
    from cidboot.trust.tpm.reference import bootstrap_events

    fake = _FakeTpm()
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes((Path(__file__).parents[1] / "vectors/tpm/ovmf-eventlog.bin").read_bytes())
    monkeypatch.setattr(stage_tpm, "_open", lambda paths: fake)
    monkeypatch.setattr(stage_main, "tpm_device_present", lambda: True)
    monkeypatch.setattr(stage_tpm, "available", lambda: True)
    real_start = stage_tpm.start
    monkeypatch.setattr(stage_tpm, "start", lambda: real_start(log_path=str(log)))
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    guest = tmp_path / "guest"
    guest.mkdir()
    start = stage_main.read_start(guest)
    assert start.boot_mode == "measured" and start.tpm is not None and start.dice is not None
    chain = decode_handover(bytes(start.dice)).chain
    assert len(verify_chain(chain).entries) == 0  # [L1 key]: the chain starts at L1
    anchor = tmp_path / "trust-anchor.json"
    keys.write_root(ANCHOR, anchor)
    with running_gateway(store) as gw:
        start.bootconfig = BootConfig(signed.cid, (_url(gw),)).encode()
        plan, _ = stage_main.attempt(start, anchor_path=anchor, nvram_path=_nvram(tmp_path),
                                     store_dir=tmp_path / "dev-store", cmdline_path=tmp_path / "none", network=False)
    t = plan.handoff.boot["tpm"]
    want = bootstrap_events(signed.cid, signed.manifest)
    assert [bytes.fromhex(e["sha256"]) for e in t["events"]] == [e.digest for e in want]
    assert t["uefi_log"] and plan.handoff.dice is not None
    import hashlib

    pcr15 = bytes(32)
    for e in want:
        pcr15 = hashlib.sha256(pcr15 + e.digest).digest()
    assert fake.pcrs[15] == pcr15
    with pytest.raises(stage_main.Refused, match="already extended"):  # a retry cannot extend again
        stage_main.attempt(start, anchor_path=anchor, nvram_path=_nvram(tmp_path), store_dir=tmp_path / "dev-store",
                           cmdline_path=tmp_path / "none", network=False)


def test_a_tpm_boot_that_extended_pcr15_retries_by_rebooting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """on_failure=retry after PCR 15 got this try's events (a private image's key request failed):
    trying again in the same boot could only be refused ("already extended"), so the bootstrap
    reboots, which resets PCR 15; a boot that never extended it retries in place as before."""
    from bootstrap.stage.tpm import TpmRoot

    cid = CID.parse("bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
    kw, calls = _main_env(tmp_path, monkeypatch, BootConfig(cid, ("http://127.0.0.1:1",), on_failure="retry").encode())
    monkeypatch.setattr(stage_main.pid1, "power_off",
                        lambda reason="", restart=False: calls.append(("power_off", reason, restart)))
    sleeps: list[float] = []
    monkeypatch.setattr(stage_main.time, "sleep", sleeps.append)
    real_read = stage_main.read_start

    def read_start(root: Path) -> stage_main.Start:
        start = real_read(root)
        start.tpm = TpmRoot(b"", (), "ab" * 16)
        return start

    def fails(start: stage_main.Start, **_: object) -> None:
        start.tpm.extended = True  # as prepare's stage_tpm.measure does before the key request
        raise Refused("keys", "no keys for manifest X: key broker unreachable")

    monkeypatch.setattr(stage_main, "read_start", read_start)
    monkeypatch.setattr(stage_main, "attempt", fails)
    stage_main.main(**kw)  # type: ignore[arg-type]
    cap = capsys.readouterr()
    assert cap.out.count("cidboot: refused: keys") == 1 and "rebooting in" in cap.out + cap.err
    assert calls == [("power_off", "", True)] and sleeps == [stage_main.RETRY_PAUSE]


def _runtime_of(data: bytes, cid: CID, paths: tuple[str, ...] = ("usr",)) -> Any:
    from cidboot.stage.switch_root import Runtime

    return Runtime(str(cid), len(data), hashlib.sha256(data).digest(), hashlib.sha512(data).digest(), paths)


def test_the_running_runtime_layer_is_not_fetched_on_the_same_kernel_path_and_the_measurement_is_the_same(
        tmp_path: Path) -> None:
    """The runtime layer's CID is this image's runtime.json cid, on the same-kernel path: only its
    root block is fetched (size checked), the initrd is the layers after it, CDI_2 is unchanged."""
    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    kernel, runtime = layers[0].cid, layers[1].cid
    rt = _runtime_of(BLOBS["runtime"], runtime)
    paths: list[str] = []

    def record(path: str, body: bytes) -> bytes:
        paths.append(path)
        return body

    with running_gateway(store) as gw, proxy_gateway(_url(gw), record) as counted:
        plan = _run_reusing(tmp_path / "a", signed.cid, [counted], kernel, "console=ttyS0 quiet", runtime=rt)
        runtime_requests = [p for p in paths if str(runtime) in p]
        full = _run_reusing(tmp_path / "b", signed.cid, [counted], kernel, "console=ttyS0 quiet", runtime=None)
    assert runtime_requests == [f"/ipfs/{runtime}?format=raw"]
    assert plan.runtime_cid == runtime and plan.initrd == BLOBS["agent"] + BLOBS["config"]
    assert full.runtime_cid is None and full.initrd == BLOBS["runtime"] + plan.initrd
    _assert_same_cdi_2(plan, full)


def test_the_runtime_layer_is_fetched_unless_it_is_the_running_one_on_the_same_kernel_path(tmp_path: Path) -> None:
    from bootstrap.stage.verify import reuses_running_runtime

    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    runtime = layers[1].cid
    rt = _runtime_of(BLOBS["runtime"], runtime)
    with running_gateway(store) as gw:
        # the kernel is not the running one
        kexec = _run_reusing(tmp_path / "a", signed.cid, [_url(gw)], None, "console=ttyS0 quiet", runtime=rt)
    assert kexec.runtime_cid is None and kexec.initrd.startswith(BLOBS["runtime"])
    m = signed.manifest
    assert reuses_running_runtime(m, rt)
    assert not reuses_running_runtime(m, _runtime_of(BLOBS["agent"], layers[2].cid))  # another runtime
    assert not reuses_running_runtime(m, _runtime_of(BLOBS["runtime"] + b"x", runtime))  # its size is not the layer's
    raw_codec = CID(1, 0x55, runtime.multihash)  # same digest, another codec: not the same DAG
    assert not reuses_running_runtime(m, _runtime_of(BLOBS["runtime"], raw_codec))
    reordered = Manifest(m.name, m.version, m.expires, (layers[0], layers[2], layers[1], layers[3]), m.root)
    assert not reuses_running_runtime(reordered, rt)  # the initramfs does not begin with it
    assert not reuses_running_runtime(m, None)


def test_an_unfetched_runtime_is_kept_and_fetched_for_a_late_kexec(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cidboot.stage import switch_root as sr

    store, layers = _store(tmp_path)
    signed = _publish(store, layers)
    rt = _runtime_of(BLOBS["runtime"], layers[1].cid)
    seen: list[Any] = []
    monkeypatch.setattr(sr, "running_runtime", lambda _root="/": rt)  # "usr" is in this root
    monkeypatch.setattr(sr, "switch_root", lambda parsed, h, **kw: seen.append(parsed))  # returns: kexec follows
    monkeypatch.setattr(sr, "parse_initramfs", lambda data, start=0, keep=(): sr.Parsed([], keep))
    with running_gateway(store) as gw:
        plan = _run_reusing(tmp_path, signed.cid, [_url(gw)], layers[0].cid, "console=ttyS0 quiet", runtime=rt)
        assert plan.runtime_cid is not None and plan.kernel is None
        cfg = BootConfig(signed.cid, (_url(gw),))
        assert stage_main.same_kernel(plan, cfg) == BLOBS["kernel"]
    [parsed] = seen
    assert parsed.keep == ("usr",)
    assert plan.initrd == b"".join(BLOBS[r] for r in ("runtime", "agent", "config")) and plan.runtime_cid is None


REPO = Path(__file__).resolve().parents[2]


def test_no_tpm_device_means_unmeasured_without_importing_the_tpm_stack(tmp_path: Path) -> None:
    """No hand-off and no TPM device node: read_start says unmeasured and has not imported
    bootstrap.stage.tpm (nor cidboot.trust.tpm); the device names are the TPM driver's."""
    from cidboot.trust.tpm.device import DEVICES

    assert stage_main.TPM_DEVICES == DEVICES
    code = ("import sys; from bootstrap.stage import main; main.TPM_DEVICES = ('/nonexistent/tpm0',); "
            f"s = main.read_start({str(tmp_path)!r}); "
            "print(s.boot_mode, sorted(m for m in sys.modules if 'tpm' in m))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["unmeasured", "[]"]


def test_a_boot_config_without_a_device_registry_does_not_import_the_registry(tmp_path: Path) -> None:
    """allowed_name returns None for a boot config that names no registry before importing
    cidboot.trust.registry, whose import pulls in the verifier's appraisal modules (~40 M guest
    instructions in the bootstrap's manifest step); with a registry named it is imported."""
    code = ("import sys; from bootstrap.stage import verify; from cidboot.netboot.bootconfig import BootConfig; "
            "from cidboot.ipld.cid import CID; "
            "cid = CID.parse('bafyreigunxpi2nqx4vmde4nofludpuu3jkoaka36uio6fzpy6v7kl5c26m'); "
            "print(verify.allowed_name(BootConfig(cid, ('http://127.0.0.1:9',)), cid, b'', None, None, "
            "boot_mode='unmeasured', store=None), "
            "'cidboot.trust.registry' in sys.modules, 'cidboot.trust.appraisal' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None", "False", "False"]
