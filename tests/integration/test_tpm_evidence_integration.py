"""TPM-rooted evidence end to end on a real TPM: swtpm + tpm2-tools play the device. UEFI's part
(PCR 0, the UKI and its kernel in PCR 4, the systemd stub's sections in PCR 11) is extended with
tpm2_pcrextend and written to a TCG log; the bootstrap's part (the manifest and its layers, PCR
15) is extended but kept out of that log, as on a device where the firmware log is closed; L1's
DICE chain certifies the image; each attestation is a real `tpm2_quote` whose qualifying data is
`qualifying_data(nonce, L1 key)`. The one appraisal entry point must affirm it, also through
`agent attest` over HTTP (checks list and EAR), and refuse: a replayed quote (old nonce), an AK
that is not enrolled, an event log that does not replay, one flipped byte in a layer event."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.attestation_api import serve_api
from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.appraisal import AFFIRMING, CONTRAINDICATED, DeviceRoots, TpmDevice, appraise
from cidboot.trust.cose_key import key_id
from cidboot.trust.dice.software import derive_layers
from cidboot.trust.ear import verify_ear
from cidboot.trust.eat import TPM_MEASURED, build_evidence
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from cidboot.trust.measure import image_inputs
from cidboot.trust.tpm import eventlog
from cidboot.trust.tpm.appraise import TpmReferences
from cidboot.trust.tpm.eventlog import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_SEPARATOR,
)
from cidboot.trust.tpm.evidence import TpmEvidence, measure_manifest, qualifying_data, ueid
from cidboot.trust.tpm.quote import parse_public
from cidboot.trust.tpm.reference import uki_applications, uki_pcr11_events
from tests.support.soft_tpm import small_uki
from tests.support.swtpm import Swtpm

pytestmark = [pytest.mark.tpm]
SIGNER = ed25519.Ed25519PrivateKey.generate()
MANIFEST = Manifest("hello", 1, int(time.time()) + 3600,
                    (Layer(CID.of(b"kernel", RAW), 6, "kernel"), Layer(CID.of(b"agent", RAW), 5, "agent")),
                    RootOfTrust.from_public_keys([SIGNER.public_key()], 1))
SIGNED = sign_manifest(MANIFEST, [SIGNER])
UKI = small_uki()
PCRS = (0, 4, 11, 15)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("tpm-evidence")
    fw = [(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, hashlib.sha256(b"OVMF code").digest(), bytes(16))]
    fw += [(i, EV_SEPARATOR, hashlib.sha256(bytes(4)).digest(), bytes(4)) for i in (0, 4)]
    fw += [(4, EV_EFI_BOOT_SERVICES_APPLICATION, d, bytes(32)) for d in uki_applications(UKI)]
    fw += [(e.pcr, e.event_type, e.digest, e.data or b"") for e in uki_pcr11_events(UKI)]
    boot = measure_manifest(SIGNED.cid, [layer.cid for layer in MANIFEST.layers])
    with Swtpm(base / "device") as tpm, Swtpm(base / "other") as other:
        ak = tpm.create_ak()
        stranger = other.create_ak()
        for pcr, _, digest, _ in fw:
            tpm.extend(pcr, digest)
        for e in boot:
            tpm.extend(e.pcr, e.digest)  # the bootstrap's own events: not in the firmware log
        log = eventlog.build(fw)
        baseline = eventlog.parse(log).replay()[0]
        dice = derive_layers(os.urandom(32), [image_inputs(SIGNED.cid, MANIFEST, [key_id(SIGNER.public_key())])])
        roots = DeviceRoots()
        roots.add_tpm(TpmDevice(ak.public.read_bytes(), {0: baseline}), "swtpm-device", "worker")
        yield {"tpm": tpm, "other": other, "ak": ak, "stranger": stranger, "log": log, "boot": boot, "dice": dice,
               "roots": roots, "base": base}


def tpm_evidence(d: Any, quote_nonce: bytes, *, ak: Any = None, tpm: Any = None, log: bytes | None = None,
                 boot: Any = None) -> TpmEvidence:
    ak = ak or d["ak"]
    attest, sig = (tpm or d["tpm"]).quote(ak, qualifying_data(quote_nonce, d["dice"].root_public_key), list(PCRS),
                                          out=f"q{os.getpid()}")
    return TpmEvidence(attest, sig, ak.public.read_bytes(), d["log"] if log is None else log,
                       tuple(d["boot"] if boot is None else boot), PCRS)


def eat(d: Any, nonce: bytes, tev: TpmEvidence) -> bytes:
    return build_evidence(nonce=nonce, leaf_key=d["dice"].leaf_key, chain=d["dice"].chain,
                          ueid=ueid(parse_public(tev.ak_public).name), measurements={}, manifest_cid=SIGNED.cid,
                          boot_mode=TPM_MEASURED, role="worker", tpm=tev)


def run(d: Any, evidence: bytes, nonce: bytes) -> dict[str, tuple[str, str]]:
    res = appraise(evidence, expected_nonce=nonce, roots=d["roots"], manifest=MANIFEST, manifest_cid=SIGNED.cid,
                   tpm_references=TpmReferences.for_uki(UKI))
    out = {c.name: (c.status, c.reason) for c in res.checks}
    out["status"] = (res.status, json.dumps(res.to_obj())[:2000])
    return out


def test_real_quote_over_the_binding_is_affirming(device: Any) -> None:
    nonce = os.urandom(32)
    out = run(device, eat(device, nonce, tpm_evidence(device, nonce)), nonce)
    assert out["status"][0] == AFFIRMING, out["status"][1]
    for check in ("tpm.ak-enrolled", "tpm.quote-signature", "tpm.nonce-binding", "tpm.replay", "tpm.firmware",
                  "tpm.pcr4-uki", "tpm.pcr11-sections", "tpm.pcr15-manifest", "dice-chain", "role"):
        assert out[check][0] == AFFIRMING, (check, out[check])


def test_replayed_quote_is_refused(device: Any) -> None:
    old, new = os.urandom(32), os.urandom(32)
    stale = tpm_evidence(device, old)
    out = run(device, eat(device, new, stale), new)
    assert out["tpm.nonce-binding"][0] == CONTRAINDICATED and out["status"][0] == CONTRAINDICATED


def test_ak_not_enrolled_is_refused(device: Any) -> None:
    nonce = os.urandom(32)
    out = run(device, eat(device, nonce, tpm_evidence(device, nonce, ak=device["stranger"], tpm=device["other"])), nonce)
    assert out["tpm.ak-enrolled"][0] == CONTRAINDICATED and out["device"][0] == CONTRAINDICATED


def test_log_that_does_not_replay_is_refused(device: Any) -> None:
    nonce = os.urandom(32)
    events = eventlog.parse(device["log"]).events
    cut = eventlog.build([(e.pcr, e.event_type, e.sha256, e.data) for e in events[:-1]])
    out = run(device, eat(device, nonce, tpm_evidence(device, nonce, log=cut)), nonce)
    assert out["tpm.replay"][0] == CONTRAINDICATED


@pytest.mark.parametrize("field", ["digest", "cid"])
def test_one_flipped_byte_in_a_layer_event_is_refused(device: Any, field: str) -> None:
    nonce = os.urandom(32)
    boot = list(device["boot"])
    raw = bytearray(getattr(boot[1], field))
    raw[-1] ^= 0x01
    boot[1] = dataclasses.replace(boot[1], **{field: bytes(raw)})
    out = run(device, eat(device, nonce, tpm_evidence(device, nonce, boot=boot)), nonce)
    failed = "tpm.replay" if field == "digest" else "tpm.pcr15-manifest"
    assert out[failed][0] == CONTRAINDICATED, out


def test_agent_attest_over_http_with_a_real_tpm(device: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`agent attest` against an agent whose evidence carries a fresh swtpm quote per nonce."""
    from agent.attestation_api import Attester
    from agent.cli import main

    d = device
    attester = Attester.from_chain(d["dice"].leaf_key, d["dice"].chain, manifest_cid=SIGNED.cid, role="worker",
                                   tpm=lambda n: tpm_evidence(d, n), ueid=ueid(parse_public(d["ak"].public.read_bytes()).name))
    srv = serve_api(attester, "127.0.0.1", 0)
    srv.start()
    try:
        store = Blockstore(tmp_path / "store")
        store.put(SIGNED.cid, SIGNED.encode())
        d["roots"].save(tmp_path / "roots.json")
        (tmp_path / "uki.efi").write_bytes(UKI)
        vkey = keys.generate()
        keys.write_keypair(vkey, tmp_path / "verifier")
        base = [srv.url, "--manifest", str(SIGNED.cid), "--store", str(tmp_path / "store"), "--roots",
                str(tmp_path / "roots.json"), "--uki", str(tmp_path / "uki.efi"), "--timeout", "60"]
        assert main(["attest", *base, "--json"]) == 0, capsys.readouterr()
        assert json.loads(capsys.readouterr().out)["status"] == AFFIRMING
        assert main(["attest", *base, "--ear", "--ear-key", str(tmp_path / "verifier.pem")]) == 0
        claims = verify_ear(capsys.readouterr().out.strip(), vkey.public_key())
        assert claims["submods"]["cidboot"]["ear.trustworthiness-vector"]["hardware"] == 2
    finally:
        srv.shutdown()
        srv.server_close()
