"""The bootstrap's decrypt step (bootstrap.stage.verify.unlock, docs/privacy.md): a manifest with
encrypted layers boots only with keys from the key broker, asked with the evidence the agent will
give (signed with the L2 key of CDI_2); the broker's appraisal refuses unmeasured boots and
tampered bootstraps, and the refusal names its check; damaged ciphertext is refused with its CID;
plaintext never reaches the device's block store; an unencrypted manifest never asks a broker."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.server.keys import KeyServer, serve_keys
from bootstrap.stage.main import ephemeral_dice
from bootstrap.stage.nvram import Nvram
from bootstrap.stage.verify import BootPlan, Refused, prepare, reuses_running_kernel, running_kernel_sha256
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs.importer import ImportOptions, import_bytes
from cidboot.netboot.bootconfig import BootConfig
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys as signing_keys
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.cose_key import key_id, raw_public_bytes
from cidboot.trust.dice import DiceInputs, DiceMode, decode_handover, encode_handover
from cidboot.trust.dice.derive import derive_id
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.manifest import Layer, Manifest, Plaintext, RootOfTrust, SignedManifest, sign_manifest
from cidboot.trust.measure import image_inputs
from cidboot.trust.private import keys, stream
from cidboot.trust.private.broker import KeyBroker, Policy
from tests.support.gateway_fixtures import proxy_gateway, running_gateway
from tests.support.private_devices import Log

UDS = bytes(range(32))
K1 = signing_keys.generate()
ANCHOR = RootOfTrust.from_public_keys([K1.public_key()], 1)
FW, BS = hashlib.sha512(b"firmware").digest(), hashlib.sha512(b"bootstrap").digest()
SECRET = os.urandom(32)
MARKER = b"private-marker-bootstrap-7a3c"
PLAIN = {"kernel": os.urandom(5000), "runtime": os.urandom(stream.CHUNK_SIZE * 2 + 77),
         "operations": b"print('hi')\n" + MARKER + os.urandom(stream.CHUNK_SIZE)}
OPTS = ImportOptions(cid_version=1, chunk_size=16384)
POLICY = Policy.from_obj({"version": 1, "manifests": {"hello": {"roles": ["worker"]}}})


def _firmware(config_raw: bytes, bootstrap: bytes = BS, uds: bytes = UDS) -> tuple[list[DiceInputs], bytes]:
    inputs = [DiceInputs(code_hash=FW, mode=DiceMode.NORMAL),
              DiceInputs(code_hash=bootstrap, config_descriptor=config_raw, mode=DiceMode.NORMAL)]
    ident = derive_layers(uds, inputs)
    return inputs, encode_handover(ident.cdi_attest, ident.cdi_seal, ident.chain)


class Broker:
    def __init__(self, server: KeyServer, log: Log, broker: KeyBroker) -> None:
        self.server, self.log, self.broker = server, log, broker

    @property
    def url(self) -> str:
        return self.server.url


def _publish(store: Blockstore, ciphertexts: dict[str, bytes] | None = None,
             encrypt: tuple[str, ...] = ("kernel", "runtime", "operations"), broker: Broker | None = None) -> SignedManifest:
    """A signed manifest whose `encrypt` layers are stored as their ciphertext (a tampering test
    may give other bytes for a layer in `ciphertexts`), pinning firmware and bootstrap."""
    layers = []
    for role, data in PLAIN.items():
        if role in encrypt:
            enc = keys.encrypt_layer(SECRET, data, role)
            body = (ciphertexts or {}).get(role, enc.ciphertext)
            cid = import_bytes(body, store, OPTS).cid
            layers.append(Layer(cid, len(body), role, Plaintext(enc.sha256, enc.size)))
        else:
            layers.append(Layer(import_bytes(data, store, OPTS).cid, len(data), role))
    m = Manifest("hello", 1, int(time.time()) + 3600, tuple(layers), ANCHOR, {"firmware": FW, "bootstrap": BS},
                 cmdline="console=ttyS0")
    signed = sign_manifest(m, [K1])
    store.put(signed.cid, signed.encode())
    if broker is not None:
        broker.broker.add_manifest(signed, ANCHOR)
    return signed


@pytest.fixture
def broker() -> Iterator[Broker]:
    roots = DeviceRoots()
    roots.add(derive_layers(UDS, []).root_public_key, "device-0", "worker")
    log = Log()
    b = KeyBroker(roots, POLICY, {"hello": SECRET}, log=log)
    server = serve_keys(b, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield Broker(server, log, b)
    finally:
        server.shutdown()
        server.server_close()


def _url(gw: object) -> str:
    return f"http://127.0.0.1:{gw.server_address[1]}"  # type: ignore[attr-defined]


def _boot(tmp: Path, cid: CID, gateway: str, keys_url: str | None, *, mode: str = "measured",
          bootstrap: bytes = BS, device_id: str | None = None, **running: Any) -> tuple[BootPlan, Path]:
    cfg = BootConfig(cid, (gateway,), role="worker", keys=keys_url)
    raw = cfg.encode()
    dice = _firmware(raw, bootstrap)[1] if mode == "measured" else bytes(ephemeral_dice())
    nv = tmp / "nvram.img"
    if not nv.exists():
        nv.write_bytes(bytes(1 << 20))
    dev_store = tmp / f"dev-store-{time.monotonic_ns()}"
    plan = prepare(cfg, raw, dice, boot_mode=mode, anchor=ANCHOR, nvram=Nvram(nv), store=Blockstore(dev_store),
                   timeout=5, carry_dice=mode == "measured", device_id=device_id, **running)
    return plan, dev_store


def _files_contain(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_measured_device_gets_the_keys_and_boots_the_plaintext(tmp_path: Path, broker: Broker) -> None:
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    with running_gateway(store) as gw:
        plan, dev_store = _boot(tmp_path, signed.cid, _url(gw), broker.url)
    assert plan.kernel == PLAIN["kernel"] and plan.initrd == PLAIN["runtime"] + PLAIN["operations"]
    assert plan.unlocked is not None and plan.unlocked.layers == 3 and "decrypt_mibps=" in plan.unlocked.line()
    [entry] = broker.log
    assert entry["decision"] == "release" and entry["status"] == "affirming", entry
    # the evidence was the agent's: the broker appraised the very chain the image receives
    assert entry["device_id"] == derive_id(raw_public_bytes(derive_layers(UDS, []).root_public_key)).hex()
    inputs, _ = _firmware(BootConfig(signed.cid, (_url(gw),), role="worker", keys=broker.url).encode())
    want = derive_layers(UDS, [*inputs, image_inputs(signed.cid, signed.manifest, [key_id(K1.public_key())])])
    assert plan.handoff.dice is not None and decode_handover(plan.handoff.dice).chain == want.chain
    # ciphertext only in the device's store and the server's: the marker is in neither
    assert not _files_contain(dev_store, MARKER) and not _files_contain(tmp_path / "server-store", MARKER)
    assert Nvram(tmp_path / "nvram.img").load_state(ANCHOR).highest == {"hello": 1}


def test_an_encrypted_running_kernel_layer_is_not_fetched_nor_decrypted(tmp_path: Path, broker: Broker,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The encrypted kernel layer's signed plaintext SHA-256 is the running kernel's (kernel.sha256)
    and its parameters are in effect: only its root block is fetched (its size checked), nothing
    of it decrypted, the plan has no kernel bytes but keeps its key (a late kexec decrypts with
    it), and CDI_2 is what the boot that fetched and decrypted it got."""
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    kernel = signed.manifest.layers[0]
    assert kernel.role == "kernel" and kernel.plaintext is not None
    running: dict[str, Any] = {"running_kernel_sha256": hashlib.sha256(PLAIN["kernel"]).digest(),
               "running_cmdline": "console=ttyS0 quiet"}
    paths: list[str] = []

    def record(path: str, body: bytes) -> bytes:
        paths.append(path)
        return body

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running_gateway(store) as gw, proxy_gateway(_url(gw), record) as counted:
        plan, _ = _boot(tmp_path / "a", signed.cid, counted, broker.url, **running)
        kernel_requests = [p for p in paths if str(kernel.cid) in p]
        full, _ = _boot(tmp_path / "b", signed.cid, counted, broker.url, running_cmdline="console=ttyS0 quiet")
        # late: the image's initramfs cannot be unpacked here, so kexec: the kernel layer is fetched
        # now and decrypted with the key kept for it (checked against its plaintext hash)
        from bootstrap.stage import main as stage_main
        from cidboot.stage import switch_root

        def unreadable(_data: bytes, **_kw: Any) -> None:
            raise switch_root.UnsupportedCompression("initramfs: zstd at 0: this stage reads gzip and xz")

        monkeypatch.setattr(switch_root, "parse_initramfs", unreadable)
        cfg = BootConfig(signed.cid, (counted,), role="worker", keys=broker.url)
        assert stage_main.same_kernel(plan, cfg) == PLAIN["kernel"]
        wrong = dataclasses.replace(plan, kernel_key=os.urandom(32))
        with pytest.raises(Refused, match=f"decrypt: kernel layer {kernel.cid}"):
            stage_main.same_kernel(wrong, cfg)
    assert kernel_requests == [f"/ipfs/{kernel.cid}?format=raw"]
    assert plan.kernel is None and plan.kernel_cid == kernel.cid and full.kernel == PLAIN["kernel"]
    assert plan.initrd == full.initrd == PLAIN["runtime"] + PLAIN["operations"]
    assert plan.unlocked is not None and plan.unlocked.layers == 2 and full.unlocked is not None \
        and full.unlocked.layers == 3 and full.kernel_key is None
    assert plan.kernel_key is not None and b"".join(keys.decrypt_layer(
        plan.kernel_key, [_cat(store, kernel.cid)], sha256=kernel.plaintext.sha256,
        size=kernel.plaintext.size)) == PLAIN["kernel"]
    assert plan.handoff.dice is not None and full.handoff.dice is not None
    mine, theirs = decode_handover(plan.handoff.dice), decode_handover(full.handoff.dice)
    assert (mine.cdi_attest, mine.cdi_seal) == (theirs.cdi_attest, theirs.cdi_seal)


def _cat(store: Blockstore, cid: CID) -> bytes:
    from cidboot.ipld.unixfs.exporter import export_file

    return b"".join(export_file(cid, store.get))


def test_an_encrypted_running_runtime_layer_is_not_fetched_and_its_key_is_kept(tmp_path: Path, broker: Broker,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The encrypted runtime layer's signed plaintext SHA-256 and size are runtime.json's, on the
    same-kernel path: neither fetched beyond its root block nor decrypted, its key kept; a late
    kexec fetches it, decrypts it with that key and checks it (a wrong key is refused with its CID)."""
    from bootstrap.stage import main as stage_main
    from cidboot.stage import switch_root

    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    runtime = signed.manifest.layers[1]
    assert runtime.role == "runtime" and runtime.plaintext is not None
    data = PLAIN["runtime"]
    rt = switch_root.Runtime("bafkreiplaintextcid", len(data), hashlib.sha256(data).digest(),
                             hashlib.sha512(data).digest(), ("usr",))
    running: dict[str, Any] = {"running_kernel_sha256": hashlib.sha256(PLAIN["kernel"]).digest(),
                               "running_cmdline": "console=ttyS0", "running_runtime": rt}
    with running_gateway(store) as gw:
        plan, _ = _boot(tmp_path, signed.cid, _url(gw), broker.url, **running)
        assert plan.runtime_cid == runtime.cid and plan.runtime_key is not None and plan.kernel_key is not None
        assert plan.initrd == PLAIN["operations"] and plan.unlocked is not None and plan.unlocked.layers == 1

        def unreadable(_data: bytes, **_kw: Any) -> None:
            raise switch_root.UnsupportedCompression("initramfs: zstd at 0: this stage reads gzip and xz")

        monkeypatch.setattr(switch_root, "parse_initramfs", unreadable)
        monkeypatch.setattr(switch_root, "running_runtime", lambda _root="/": rt)
        cfg = BootConfig(signed.cid, (_url(gw),), role="worker", keys=broker.url)
        wrong = dataclasses.replace(plan, runtime_key=os.urandom(32))
        with pytest.raises(Refused, match=f"decrypt: runtime layer {runtime.cid}"):
            stage_main.same_kernel(wrong, cfg)
        assert stage_main.same_kernel(plan, cfg) == PLAIN["kernel"]
    assert plan.initrd == PLAIN["runtime"] + PLAIN["operations"]


def test_the_running_kernel_rule_by_plaintext_hash_and_by_cid() -> None:
    """An encrypted kernel layer is the running kernel by its plaintext SHA-256 only (its CID is
    the ciphertext's, never the running image's kernel.cid), a plain one by its CID only; the
    parameters must be in effect either way, and nothing to compare with (a forced kexec: None)
    is no reuse."""
    plain_k = Layer(import_bytes(PLAIN["kernel"], None, OPTS).cid, len(PLAIN["kernel"]), "kernel")
    sha = hashlib.sha256(PLAIN["kernel"]).digest()
    enc_k = Layer(CID.of(b"ciphertext"), stream.ciphertext_size(len(PLAIN["kernel"])), "kernel",
                  Plaintext(sha, len(PLAIN["kernel"])))

    def m(k: Layer) -> Manifest:
        return Manifest("hello", 1, 2**31, (k,), ANCHOR, {}, cmdline="console=ttyS0")

    on = "console=ttyS0 quiet"
    assert reuses_running_kernel(m(enc_k), None, on, sha)
    assert not reuses_running_kernel(m(enc_k), enc_k.cid, on, None)  # the ciphertext CID says nothing
    assert not reuses_running_kernel(m(enc_k), None, on, hashlib.sha256(b"another kernel").digest())
    assert not reuses_running_kernel(m(enc_k), None, "quiet", sha)  # console=ttyS0 not in effect
    assert not reuses_running_kernel(m(enc_k), None, None, sha)
    assert reuses_running_kernel(m(plain_k), plain_k.cid, on, None)
    assert not reuses_running_kernel(m(plain_k), None, on, sha)  # a plain layer: by CID, as before


def test_running_kernel_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "kernel.sha256"
    assert running_kernel_sha256(f) is None
    f.write_text("not hex\n")
    assert running_kernel_sha256(f) is None
    f.write_text("ab" * 31 + "\n")  # 31 bytes: not a SHA-256
    assert running_kernel_sha256(f) is None
    f.write_text(hashlib.sha256(b"k").hexdigest() + "\n")
    assert running_kernel_sha256(f) == hashlib.sha256(b"k").digest()


def test_unmeasured_boot_gets_no_key_and_the_refusal_names_the_check(tmp_path: Path, broker: Broker) -> None:
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    with running_gateway(store) as gw, pytest.raises(Refused) as e:
        _boot(tmp_path, signed.cid, _url(gw), broker.url, mode="unmeasured")
    assert e.value.check == "keys" and "measured-boot: unmeasured boot" in e.value.detail, e.value
    [entry] = broker.log
    assert entry["decision"] == "refuse" and entry["status"] == "contraindicated"
    assert any(c["check"] == "measured-boot" and c["status"] == "contraindicated" for c in entry["checks"])
    assert Nvram(tmp_path / "nvram.img").read() is None  # nothing accepted


def test_tampered_bootstrap_gets_no_key(tmp_path: Path, broker: Broker) -> None:
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    with running_gateway(store) as gw, pytest.raises(Refused) as e:
        _boot(tmp_path, signed.cid, _url(gw), broker.url, bootstrap=hashlib.sha512(b"bootstrap, patched").digest())
    assert e.value.check == "keys" and "measurements: bootstrap measurement" in e.value.detail, e.value
    assert broker.log[-1]["check"] == "measurements" and broker.log[-1]["decision"] == "refuse"


def test_no_broker_configured_unreachable_or_no_tpm_is_refused_and_says_why(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from bootstrap.stage import verify

    sleeps: list[float] = []
    monkeypatch.setattr(verify.time, "sleep", sleeps.append)
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store)
    with running_gateway(store) as gw:
        with pytest.raises(Refused, match="names no key broker") as e:
            _boot(tmp_path, signed.cid, _url(gw), None)
        assert e.value.check == "keys"
        with pytest.raises(Refused, match=f"no keys for manifest {signed.cid}") as e:
            _boot(tmp_path, signed.cid, _url(gw), "http://127.0.0.1:1")
        assert e.value.check == "keys" and "(3 tries)" in e.value.detail, e.value
        assert sleeps == list(verify.KEY_RETRY_PAUSES)  # an unreachable broker is asked again before refusing
        with pytest.raises(Refused, match="TPM-rooted boot has no TPM to quote with"):
            _boot(tmp_path, signed.cid, _url(gw), "http://127.0.0.1:1", device_id="ab" * 16)


def test_unencrypted_manifest_never_asks_a_broker(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, encrypt=())
    with running_gateway(store) as gw:
        plan, _ = _boot(tmp_path, signed.cid, _url(gw), "http://127.0.0.1:1")  # a dead broker: never asked
    assert plan.unlocked is None and plan.kernel == PLAIN["kernel"]


def test_damaged_ciphertext_is_refused_at_the_cid_check_or_decryption_naming_the_cid(tmp_path: Path,
                                                                                    broker: Broker) -> None:
    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    rt = next(lyr.cid for lyr in signed.manifest.layers if lyr.role == "runtime")
    for damage in (lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b[:len(b) // 2]):  # flipped byte, truncated
        def mangle(path: str, body: bytes, damage=damage) -> bytes:
            return damage(body) if str(rt) in path else body

        with running_gateway(store) as gw, proxy_gateway(_url(gw), mangle) as lying, pytest.raises(Refused) as e:
            _boot(tmp_path, signed.cid, lying, broker.url)
        assert e.value.check == f"layer {rt}", e.value
    assert broker.log == []  # refused before any key was asked for
    # a signed manifest whose ciphertext has two chunks swapped: the CID matches, decryption refuses
    c = stream.SEALED_CHUNK_SIZE
    good = keys.encrypt_layer(SECRET, PLAIN["runtime"], "runtime").ciphertext
    swapped = good[c:2 * c] + good[:c] + good[2 * c:]
    bad = _publish(Blockstore(tmp_path / "server-store-2"), {"runtime": swapped})
    bad_rt = next(lyr.cid for lyr in bad.manifest.layers if lyr.role == "runtime")
    with running_gateway(Blockstore(tmp_path / "server-store-2")) as gw, pytest.raises(Refused) as e:
        broker.broker.add_manifest(bad, ANCHOR)
        (tmp_path / "second").mkdir()
        _boot(tmp_path / "second", bad.cid, _url(gw), broker.url)
    assert e.value.check == "decrypt" and str(bad_rt) in e.value.detail and "ChunkReorderedError" in e.value.detail


def test_main_prints_the_refusal_posts_the_event_and_powers_off(tmp_path: Path, broker: Broker,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """As PID 1: a broker refusal is `cidboot: refused: keys: ...` on the console naming the
    broker's check, a `refused` stage event with check "keys", a power-off, and no kexec."""
    from bootstrap.stage import main as stage_main
    from cidboot.stage import kexec
    from cidboot.stage.handoff import Handoff, canonical_json

    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store, broker=broker)
    calls: list[tuple[object, ...]] = []
    emitted: list[tuple[str, str, dict[str, object]]] = []
    monkeypatch.setattr(stage_main, "network_up", lambda start: ("10.0.0.2", None))
    monkeypatch.setattr(stage_main.pid1, "power_off", lambda reason="": calls.append(("power_off", reason)))
    monkeypatch.setattr(kexec, "kexec_boot", lambda k, i, c: calls.append(("kexec",)))
    monkeypatch.setattr(stage_main.events, "emit", lambda stage, event, **kw: emitted.append((stage, event, kw)))
    anchor = tmp_path / "trust-anchor.json"
    signing_keys.write_root(ANCHOR, anchor)
    nv = tmp_path / "nvram.img"
    nv.write_bytes(bytes(1 << 20))
    with running_gateway(store) as gw:
        raw = BootConfig(signed.cid, (_url(gw),), role="worker", keys=broker.url).encode()
        _, dice = _firmware(raw, hashlib.sha512(b"bootstrap, patched").digest())
        guest = tmp_path / "guest"
        (guest / "run/cidboot").mkdir(parents=True)
        (guest / "run/cidboot/dice.cbor").write_bytes(dice)
        (guest / "run/cidboot/boot.json").write_bytes(canonical_json({"boot_mode": "measured", "bootconfig": raw.decode()}))
        Handoff(dice, {"boot_mode": "measured", "bootconfig": raw.decode()}).validate()
        stage_main.main(root=guest, anchor_path=anchor, nvram_path=nv, store_dir=None, cmdline_path=tmp_path / "none")
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("cidboot: refused: "))
    assert line.startswith(f"cidboot: refused: keys: key broker {broker.url} refused the keys of manifest {signed.cid}: "
                           "measurements: "), line
    assert calls == [("power_off", "")] and "handover" not in out
    refused = [kw for stage, event, kw in emitted if event == "refused"]
    assert refused and refused[0]["check"] == "keys" and "measurements" in str(refused[0]["reason"])


class _SoftBootTpm:
    """The TPM bootstrap.stage.tpm and the quoter talk to, in software: the firmware's PCRs are
    the replay of tests.support.soft_tpm's event log, PCR 15 gets the bootstrap's extends, the
    CDI is an HMAC keyed by PCR 15 (standing in for the PCR-bound TPM key), quotes are signed by
    the soft AK over the log's PCRs plus PCR 15's extends: what swtpm does in the integration tests."""

    def __init__(self, soft: object) -> None:
        self.soft = soft
        self.pcr15 = bytes(32)
        self.extra: list[tuple[int, bytes]] = []

    def __enter__(self) -> _SoftBootTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def pcr_values(self, pcrs: object) -> dict[int, bytes]:
        return {i: self.pcr15 if i == 15 else bytes(32) for i in pcrs}  # type: ignore[attr-defined]

    def cdi(self, label: bytes, pcrs: object) -> bytes:
        import hmac

        return hmac.new(b"tpm seed" + self.pcr15, label, hashlib.sha256).digest()

    def extend(self, pcr: int, data: bytes, banks: object) -> dict[int, bytes]:
        d = hashlib.sha256(data).digest()
        self.pcr15 = hashlib.sha256(self.pcr15 + d).digest()
        self.extra.append((pcr, d))
        return {0x000B: d}

    def read_public(self, handle: int) -> bytes:
        return self.soft.tpm.public  # type: ignore[attr-defined]

    def quote(self, qualifying: bytes, pcrs: object) -> tuple[bytes, bytes, bytes]:
        a, sig = self.soft.tpm.quote(qualifying, list(pcrs), tuple(self.extra))  # type: ignore[attr-defined, call-overload]
        return a, sig, self.soft.tpm.public  # type: ignore[attr-defined]


def test_a_tpm_rooted_boot_asks_with_a_quote_covering_pcr15_and_gets_the_keys(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """UEFI + TPM, no L0: the bootstrap extends PCR 15 with this manifest before it asks, and asks
    with the agent's TPM evidence (the quoter's fresh quote by the enrolled AK over the request
    nonce and L1's key); the broker's TPM appraisal affirms it and releases; boot.json carries the
    same "tpm" object the agent quotes with later. A changed firmware baseline gets no key."""
    import dataclasses

    from bootstrap.stage import tpm as stage_tpm
    from cidboot.trust.tpm import quoter as tpm_quoter
    from tests.support.soft_tpm import SoftTpmDevice

    store = Blockstore(tmp_path / "server-store")
    signed = _publish(store)
    soft = SoftTpmDevice(signed.cid, signed.manifest, [key_id(K1.public_key())], role="worker")
    fake = _SoftBootTpm(soft)
    monkeypatch.setattr(stage_tpm, "_open", lambda paths: fake)
    monkeypatch.setattr(tpm_quoter, "_open", lambda paths: fake)
    (tmp_path / "uefi.log").write_bytes(soft.tpm.log())
    roots = DeviceRoots()
    roots.add_tpm(soft.device(), "tpm-dev", "worker")
    log = Log()
    b = KeyBroker(roots, POLICY, {"hello": SECRET}, log=log, tpm_references=soft.references())
    b.add_manifest(signed, ANCHOR)
    server = serve_keys(b, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with running_gateway(store) as gw:
            def boot() -> BootPlan:
                fake.pcr15, fake.extra = bytes(32), []  # a power cycle
                dice, root = stage_tpm.start(log_path=str(tmp_path / "uefi.log"))
                cfg = BootConfig(signed.cid, (_url(gw),), role="worker", keys=server.url)
                nv = tmp_path / "nvram.img"
                if not nv.exists():
                    nv.write_bytes(bytes(1 << 20))
                return prepare(cfg, cfg.encode(), bytes(dice), boot_mode="measured", anchor=ANCHOR, nvram=Nvram(nv),
                               store=Blockstore(tmp_path / "dev-store"), timeout=5, device_id=root.device_id, tpm=root)

            plan = boot()
            assert plan.kernel == PLAIN["kernel"] and plan.initrd == PLAIN["runtime"] + PLAIN["operations"]
            assert log[-1]["decision"] == "release" and log[-1]["status"] == "affirming", log[-1]
            assert any(c["check"] == "tpm.pcr15-manifest" and c["status"] == "affirming" for c in log[-1]["checks"])
            assert [e["kind"] for e in plan.handoff.boot["tpm"]["events"]] == ["manifest", "layer", "layer", "layer"]
            did = next(iter(roots.tpm))
            roots.tpm[did] = dataclasses.replace(roots.tpm[did], firmware_pcrs={0: bytes(32)})
            with pytest.raises(Refused) as e:
                boot()
            assert e.value.check == "keys" and "tpm.firmware" in e.value.detail, e.value
            assert "only a reboot lets this device ask again" in e.value.detail  # PCR 15 holds this boot's events
            assert "pcrs" in log[-1] and log[-1]["pcrs"]["15"] == fake.pcr15.hex()  # what the broker appraised
    finally:
        server.shutdown()
        server.server_close()
