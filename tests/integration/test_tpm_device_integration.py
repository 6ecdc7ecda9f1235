"""The guest's TPM access (cidboot.trust.tpm.device: raw TPM 2.0 commands, stdlib only) against a
real TPM: swtpm over its TCP data channel, the same bytes the bootstrap writes to /dev/tpmrm0.

- PCR extend + read agree with an independent computation;
- the TPM-bound CDI: the same PCRs give the same CDI (across a TPM restart: derived from the
  owner seed, nothing stored); a changed PCR gives another; and the key of the *good* policy
  cannot be used once a PCR differs (TPM_RC_POLICY_FAIL), which is what keeps a changed bootstrap
  from deriving the good CDI even though the key's template is public;
- enrolment makes the primary AK persistent at AK_HANDLE; a quote by it over
  SHA-256(nonce || L1 key) verifies with our verifier, and covers the extended PCR.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import cast

import pytest

from cidboot.trust.tpm import commands as c
from cidboot.trust.tpm import quote
from cidboot.trust.tpm.commands import TpmResponseError
from cidboot.trust.tpm.device import SocketTransport, Tpm
from qemu.harness import tpm as harness_tpm
from tests.support.swtpm import Swtpm

pytestmark = [pytest.mark.tpm]
CDI_PCRS = (4, 11, 15)


def _tpm(sw: harness_tpm.Swtpm) -> Tpm:
    return Tpm(SocketTransport("127.0.0.1", sw.port))


def test_extend_cdi_and_quote_on_a_real_tpm(tmp_path: Path) -> None:
    with Swtpm(tmp_path / "tpm") as sw, _tpm(sw) as tpm:
        assert tpm.pcr_values([15]) == {15: bytes(32)}
        tpm.extend(4, b"a bootstrap UKI")
        want4 = hashlib.sha256(bytes(32) + hashlib.sha256(b"a bootstrap UKI").digest()).digest()
        assert tpm.pcr_values(range(24))[4] == want4

        good = tpm.cdi(b"cidboot CDI_Attest", CDI_PCRS)
        assert len(good) == 32 and good == tpm.cdi(b"cidboot CDI_Attest", CDI_PCRS)
        assert tpm.cdi(b"cidboot CDI_Seal", CDI_PCRS) != good
        good_policy = c.policy_pcr_digest(tpm.pcr_values(CDI_PCRS))

        public = tpm.persist_ak()
        assert tpm.persist_ak() == public  # idempotent
        tpm.extend(15, b"cidboot manifest bafy...")
        l1 = os.urandom(32)
        nonce = os.urandom(32)
        qualifying = hashlib.sha256(nonce + l1).digest()
        attest, sig, ak_public = tpm.quote(qualifying, [4, 15])
        assert ak_public == public
        ak = quote.parse_public(ak_public)
        q = quote.verify_quote(attest, sig, ak, nonce=qualifying, enrolled=frozenset({ak.name}))
        pcrs = tpm.pcr_values([4, 15])
        assert q.pcr_digest == quote.pcr_digest(q.selection, pcrs)

        # PCR 15 moved on: another CDI, and the good key can no longer be used
        assert tpm.cdi(b"cidboot CDI_Attest", CDI_PCRS) != good
        key, _ = c.parse_create_primary(tpm.run(c.create_primary(c.RH_OWNER, c.cdi_key_template(good_policy)), "cp"))
        session = c.parse_start_session(tpm.run(c.start_policy_session(os.urandom(16)), "sas"))
        c.ok(tpm.run(c.policy_pcr(session, CDI_PCRS), "PolicyPCR"), "PolicyPCR")
        with pytest.raises(TpmResponseError) as e:
            c.parse_hmac(tpm.run(c.hmac(key, session, b"cidboot CDI_Attest"), "TPM2_HMAC"))
        assert e.value.rc is not None and e.value.rc & 0xFFF in (0x99D, 0x09D)  # TPM_RC_POLICY_FAIL (session 1)
        tpm.flush(session)
        tpm.flush(key)

    # a power cycle: PCRs reset, the seed-derived key and the persistent AK are still there
    with Swtpm(tmp_path / "tpm") as sw, _tpm(sw) as tpm:
        tpm.extend(4, b"a bootstrap UKI")
        assert tpm.cdi(b"cidboot CDI_Attest", CDI_PCRS) == good
        assert tpm.read_public(c.AK_HANDLE) == public


def test_bootstrap_tpm_boot_derives_cdi1_from_the_tpm_and_extends_pcr15(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bootstrap.stage.tpm on a real TPM: CDI_1 is the TPM's (same UKI, same CDI_1 after a power
    cycle; another UKI in PCR 4: another), PCR 15 ends as the replay of exactly the events the
    verifier derives from the signed manifest, and a second start on a used PCR 15 is refused."""
    import time

    from agent import tpm as agent_tpm
    from bootstrap.stage import tpm as stage_tpm
    from cidboot.ipld.cid import CID, RAW
    from cidboot.stage.console import StageRefused
    from cidboot.trust import keys
    from cidboot.trust.dice import decode_handover
    from cidboot.trust.manifest import Layer, Manifest, RootOfTrust
    from cidboot.trust.tpm import quoter as tpm_quoter
    from cidboot.trust.tpm.errors import NonceMismatchError
    from cidboot.trust.tpm.evidence import TpmEvidence, qualifying_data
    from cidboot.trust.tpm.evidence import device_id as tpm_device_id
    from cidboot.trust.tpm.evidence import ueid as tpm_ueid
    from cidboot.trust.tpm.reference import bootstrap_events

    log = tmp_path / "binary_bios_measurements"
    log.write_bytes((Path(__file__).parents[1] / "vectors/tpm/ovmf-eventlog.bin").read_bytes())
    k = keys.generate()
    manifest = Manifest("hello", 1, int(time.time()) + 3600,
                        tuple(Layer(CID.of(bytes([i]) * 9, RAW), 9, "other") for i in range(2)),
                        RootOfTrust.from_public_keys([k.public_key()], 1))
    mcid = CID.of(b"manifest envelope", RAW)

    def boot(uki: bytes) -> tuple[bytes, dict[str, object], Tpm]:
        sw = Swtpm(tmp_path / "tpm").start()
        try:
            tpm = _tpm(sw)
            monkeypatch.setattr(stage_tpm, "_open", lambda paths: _Borrowed(tpm))
            monkeypatch.setattr(tpm_quoter, "_open", lambda paths: _Borrowed(tpm))
            tpm.extend(4, uki)  # what UEFI would have measured
            dice, root = stage_tpm.start(log_path=str(log))
            boot = stage_tpm.measure(root, mcid, manifest)
            with pytest.raises(StageRefused, match="already extended"):
                stage_tpm.measure(root, mcid, manifest)
            with pytest.raises(StageRefused, match="PCR 15 is"):  # a later stage cannot start over
                stage_tpm.start(log_path=str(log))
            want = bytes(32)
            for e in bootstrap_events(mcid, manifest):
                want = hashlib.sha256(want + e.digest).digest()
            assert tpm.pcr_values([15])[15] == want
            # the agent (L2) quotes over the verifier's nonce bound to L1's key, with the events L1 handed on
            h = decode_handover(bytes(dice))
            quoter = agent_tpm.TpmQuoter.from_boot({"tpm": boot}, h.chain)
            nonce = os.urandom(32)
            ev = TpmEvidence.decode(quoter.evidence(nonce).encode())
            ak = quote.parse_public(ev.ak_public)
            q = quote.verify_quote(ev.quote, ev.signature, ak, nonce=qualifying_data(nonce, quoter.l1_public_key),
                                   enrolled=frozenset({ak.name}))
            assert q.pcr_digest == quote.pcr_digest(q.selection, tpm.pcr_values(ev.pcrs))
            assert root.device_id == tpm_device_id(ak.name)  # what the bootstrap looks itself up by
            assert quoter.ueid() == tpm_ueid(ak.name)  # what the agent's evidence says it is
            assert [e.digest for e in ev.bootstrap_events] == [e.digest for e in bootstrap_events(mcid, manifest)]
            assert [e.data for e in ev.log_events()] == [e.data for e in bootstrap_events(mcid, manifest)]
            with pytest.raises(NonceMismatchError):  # another nonce, or another L1 key, is another quote
                quote.verify_quote(ev.quote, ev.signature, ak, nonce=qualifying_data(os.urandom(32), quoter.l1_public_key),
                                   enrolled=frozenset({ak.name}))
            return h.cdi_attest, boot, tpm
        finally:
            sw.stop()

    a1, handed, _ = boot(b"good UKI")
    handed_events = cast(list[dict[str, str]], handed["events"])
    assert [e["kind"] for e in handed_events] == ["manifest", "layer", "layer"]
    assert handed_events[0]["sha256"] == bootstrap_events(mcid, manifest)[0].digest.hex()
    a2, _, _ = boot(b"good UKI")
    a3, _, _ = boot(b"good UKI with one byte changed")
    assert a1 == a2 and a1 != a3


class _Borrowed:
    """A Tpm the test keeps open across the stage's `with` blocks."""

    def __init__(self, tpm: Tpm) -> None:
        self.tpm = tpm

    def __enter__(self) -> Tpm:
        return self.tpm

    def __exit__(self, *exc: object) -> None:
        pass


def test_factory_enrols_the_persistent_ak_and_a_genuine_ek_certificate(tmp_path: Path) -> None:
    """qemu.harness.tpm.factory: the AK it enrols is the one a boot quotes with (persistent at
    AK_HANDLE, the same after a power cycle), and the EK certificate chains to the local CA."""
    from cryptography import x509

    from qemu.harness.tpm import factory

    enrolled = factory(tmp_path / "tpm")
    assert x509.load_der_x509_certificate(enrolled.ek_cert or b"").issuer.rfc4514_string()
    assert factory(tmp_path / "tpm") == enrolled  # idempotent: the factory can be run again
    with Swtpm(tmp_path / "tpm") as sw, _tpm(sw) as tpm:
        _, _, ak_public = tpm.quote(os.urandom(32), [0])
    assert ak_public == enrolled.ak_public


def test_agent_enrol_on_a_real_tpm(tmp_path: Path) -> None:
    """`agent enrol` (a real server's factory step) over an swtpm's TCP channel: the AK and EK
    certificate land in the roots file; the EK certificate is checked against the vendor CA
    (swtpm's local CA: accepted; another CA: refused with a named error)."""
    import json
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cidboot.trust.appraisal import DeviceRoots

    sw = Swtpm(tmp_path / "tpm").start()
    try:
        roots = tmp_path / "roots.json"
        ca = tmp_path / "tpm/localca/issuercert.pem"
        argv = [sys.executable, "-m", "agent", "enrol", "--swtpm", f"127.0.0.1:{sw.port}", "--roots", str(roots),
                "--role", "hello", "--name", "server-1", "--json"]
        proc = subprocess.run([*argv, "--ek-ca", str(ca)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        dev = DeviceRoots.load(roots).tpm[out["id"]]
        assert dev.ek_cert and dev.ak_name.hex() == out["ak_name"] and not dev.firmware_pcrs

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "not the vendor")])
        other = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                 .serial_number(1).not_valid_before(x509.load_pem_x509_certificate(ca.read_bytes()).not_valid_before_utc)
                 .not_valid_after(x509.load_pem_x509_certificate(ca.read_bytes()).not_valid_after_utc)
                 .sign(key, hashes.SHA256()))
        (tmp_path / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
        proc = subprocess.run([*argv, "--ek-ca", str(tmp_path / "other.pem")], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "EK certificate not issued by" in proc.stderr, proc.stderr
    finally:
        sw.stop()
