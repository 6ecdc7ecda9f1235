"""TPM quotes on a TPM-measured boot (docs/tpm.md, "The agent's quote"): the agent's answer to
each challenge, and the bootstrap's key request for a private image (docs/privacy.md), one code.

The bootstrap (L1) derived CDI_1 from the TPM, extended PCR 15 with the manifest and layer events
and handed on, in boot.json's "tpm" object, the firmware's event log as it read it and those
events (bootstrap.stage.tpm.measure). The agent (L2) answers each attestation challenge with a
fresh quote over `QUOTE_PCRS` whose qualifying data is SHA-256(nonce || L1 public key)
(cidboot.trust.tpm.evidence.qualifying_data): the quote is fresh and vouches for the key that
issued this agent's DICE certificate. The AK is the one enrolment made persistent at
commands.AK_HANDLE (without it, the same primary AK recreated from the endorsement seed).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID
from cidboot.trust import cose
from cidboot.trust.cose import PublicKey
from cidboot.trust.cose_key import decode_public_key
from cidboot.trust.tpm import device
from cidboot.trust.tpm.evidence import BootstrapEvent, TpmEvidence, qualifying_data, selection_of

# the firmware PCRs enrolment baselines (0-3, 5-7), the UKI (4), its sections (11), the bootstrap's (15)
QUOTE_PCRS = selection_of([0, 1, 2, 3, 4, 5, 6, 7, 11, 15])
_open = device.open_device  # tests substitute a swtpm over TCP


@dataclass
class TpmQuoter:
    """Makes the TPM claim of this agent's evidence, one fresh quote per nonce."""

    uefi_log: bytes
    events: tuple[BootstrapEvent, ...]
    l1_public_key: PublicKey
    paths: tuple[str, ...] = device.DEVICES
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_boot(cls, boot: Mapping[str, Any], chain: bytes, paths: tuple[str, ...] = device.DEVICES) -> TpmQuoter:
        """From boot.json's "tpm" object and the DICE chain (its first entry: L1's public key)."""
        t = boot.get("tpm")
        try:
            log = base64.b64decode(t["uefi_log"], validate=True)  # type: ignore[index]
            events = tuple(BootstrapEvent(int(t["pcr"]), e["kind"], bytes(CID.parse(e["cid"])), bytes.fromhex(e["sha256"]))  # type: ignore[index]
                           for e in t["events"])  # type: ignore[index]
            items = cose.cbor_loads_exact(chain, "DICE chain")
            l1 = decode_public_key(items[0])
        except (TypeError, KeyError, ValueError, IndexError, FormatError) as e:
            raise FormatError(f"boot.json tpm: {type(e).__name__}: {e}") from None
        return cls(log, events, l1, paths)

    def ueid(self) -> bytes:
        """This device's EAT ueid: that of its AK (cidboot.trust.tpm.evidence.ueid), as the verifier's registry has it."""
        from cidboot.trust.tpm.commands import AK_HANDLE
        from cidboot.trust.tpm.evidence import ueid
        from cidboot.trust.tpm.quote import parse_public

        with self.lock, _open(self.paths) as tpm:
            public = tpm.read_public(AK_HANDLE)
            if public is None:
                handle, public = tpm.create_primary_ak()
                tpm.flush(handle)
        return ueid(parse_public(public).name)

    def key_binding(self) -> bytes | None:
        """The AK's quote binding L1's key for this agent's signed stage events (the bootstrap's
        `key_binding`; bootstrap.server.fleet); None if the TPM cannot quote (events rejected)."""
        from cidboot.trust.tpm.evidence import EVENTS_NONCE, KeyBinding

        try:
            with self.lock, _open(self.paths) as tpm:
                attest, signature, ak_public = tpm.quote(qualifying_data(EVENTS_NONCE, self.l1_public_key), QUOTE_PCRS)
            return KeyBinding(attest, signature, ak_public).encode()
        except Exception:  # stage events are a report, never a reason not to serve
            return None

    def evidence(self, nonce: bytes) -> TpmEvidence:
        q = qualifying_data(nonce, self.l1_public_key)
        with self.lock, _open(self.paths) as tpm:
            attest, signature, ak_public = tpm.quote(q, QUOTE_PCRS)
        return TpmEvidence(attest, signature, ak_public, self.uefi_log, self.events, QUOTE_PCRS)
