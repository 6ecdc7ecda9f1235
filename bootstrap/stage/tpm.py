"""The bootstrap (L1) on a machine with a TPM 2.0 and no DICE engine: a TPM-rooted CDI_1 and
the bootstrap's own PCR 15 events (docs/tpm.md, "The bootstrap on a TPM boot").

When UEFI started the bootstrap UKI directly (no hand-off from a cidboot L0) and the machine has a
TPM whose firmware event log the kernel exposes, the boot is TPM-measured:

1. `start()`, first thing: PCR 15 must still be at its reset value (nothing but this bootstrap
   extends it, and only after step 2); CDI_1 (Attest and Seal) = TPM HMAC by the owner-hierarchy
   primary keyedhash key whose policy is PolicyPCR over PCRs 4, 11 and 15 as they are now
   (`CDI_PCRS`). PCR 4 holds the UKI's Authenticode hash and PCR 11 its sections (stub, kernel,
   initrd with this code and its trust anchor), so another bootstrap gets another key, and the
   key of this one cannot be used by anything that runs later (PCR 15 has moved on). The DICE
   chain starts at L1: [L1 public key]; from here the Open Profile for DICE runs exactly as on
   a DICE boot (bootstrap.stage.verify.measure derives CDI_2 and the L2 certificate).
2. `measure()`, once the manifest and every layer verified, before the hand-over: extend PCR 15
   with `cidboot manifest <cid>` and `cidboot layer <i> <cid>`, one event each (the list
   cidboot.trust.tpm.reference.bootstrap_events derives from the signed manifest), in every
   bank the firmware log declares, and return what the agent (L2) needs to quote later: the
   firmware log as read and the events, carried in boot.json under "tpm".

The quote itself is the agent's (L2): it answers each challenge with a fresh one, qualifying data
SHA-256(nonce || L1 public key).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.stage.console import StageRefused, wipe
from cidboot.trust.manifest import Manifest
from cidboot.trust.tpm import device
from cidboot.trust.tpm.eventlog import ALG_SHA256
from cidboot.trust.tpm.reference import BOOTSTRAP_PCR

CDI_PCRS = (4, 11, BOOTSTRAP_PCR)  # the UKI, its sections, and "no bootstrap event yet"
LABEL_ATTEST = b"cidboot CDI_Attest"
LABEL_SEAL = b"cidboot CDI_Seal"
SECURITYFS = "/sys/kernel/security"


_open = device.open_device  # tests substitute a swtpm over TCP


@dataclass
class TpmRoot:
    """What a TPM-measured boot carries from `start` to `measure`."""

    uefi_log: bytes
    banks: tuple[int, ...]
    device_id: str  # the registry id of this TPM (cidboot.trust.tpm.evidence.device_id of its AK's name)
    device_paths: tuple[str, ...] = device.DEVICES
    extended: bool = False  # PCR 15 holds this boot's events: never extend twice (a retry is refused)
    key_binding: bytes | None = None  # the AK's quote binding L1's key, for signed stage events (fleet)


def available(paths: tuple[str, ...] = device.DEVICES, log_path: str = device.EVENT_LOG) -> bool:
    """A TPM device node and a crypto-agile firmware event log with a SHA-256 bank: a
    TPM-measured boot is possible. Without them (no TPM, a TPM 1.2, a SHA-1-only log) the boot
    is unmeasured, which a verifier never calls affirming: the machine still boots, nothing
    passes that should not."""
    _mount_securityfs()
    if not device.present(paths) or not os.path.exists(log_path):
        return False
    try:
        device.log_banks(device.event_log(log_path))
    except CidbootError as e:
        print(f"cidboot: bootstrap: tpm: {e}: booting unmeasured", flush=True)
        return False
    return True


def _mount_securityfs() -> None:
    """The kernel shows the firmware's event log in securityfs, which PID 1 must mount itself."""
    if os.getpid() != 1 or os.path.exists(device.EVENT_LOG) or not os.path.isdir(SECURITYFS):
        return
    from cidboot.stage import pid1

    try:
        pid1.mount("securityfs", SECURITYFS, "securityfs")
    except (CidbootError, OSError):
        pass  # no securityfs: available() then sees no event log, and the boot is unmeasured


def start(paths: tuple[str, ...] = device.DEVICES, log_path: str = device.EVENT_LOG) -> tuple[bytearray, TpmRoot]:
    """Step 1: (the encoded CDI_1 handover, the TpmRoot). Refused("tpm", ...) on any failure."""
    from cidboot.trust.dice import encode_chain, encode_handover, key_from_cdi

    try:
        log = device.event_log(log_path)
        banks = device.log_banks(log)
        with _open(paths) as tpm:
            pcr = tpm.pcr_values([BOOTSTRAP_PCR])[BOOTSTRAP_PCR]
            if pcr != bytes(32):
                raise StageRefused("tpm", f"PCR {BOOTSTRAP_PCR} is {pcr.hex()}, not its reset value: something "
                                          "extended it before the bootstrap, whose PCR it is")
            attest = bytearray(tpm.cdi(LABEL_ATTEST, CDI_PCRS))
            seal = bytearray(tpm.cdi(LABEL_SEAL, CDI_PCRS))
            did = device_id(tpm)
            binding = key_binding(tpm, key_from_cdi(bytes(attest)).public_key())
    except (CidbootError, OSError) as e:
        if isinstance(e, StageRefused):
            raise
        raise StageRefused("tpm", f"{type(e).__name__}: {e}") from None
    try:
        chain = encode_chain(key_from_cdi(bytes(attest)).public_key(), [])
        out = bytearray(encode_handover(bytes(attest), bytes(seal), chain))
    finally:
        wipe(attest)
        wipe(seal)
    return out, TpmRoot(log, banks, did, paths, key_binding=binding)


def key_binding(tpm: device.Tpm, l1_public_key: object) -> bytes | None:
    """The enrolled AK's quote over qualifying_data(EVENTS_NONCE, L1 key) (PCRs 4, 11, 15 as they
    are now): how the boot server knows this boot's signed stage events are this device's
    (cidboot.trust.tpm.evidence.KeyBinding, bootstrap.server.fleet). Best effort: without it the
    events are rejected by the server, the boot is not affected (None)."""
    from cidboot.trust.tpm.evidence import EVENTS_NONCE, KeyBinding, qualifying_data

    try:
        attest, signature, ak_public = tpm.quote(qualifying_data(EVENTS_NONCE, l1_public_key), CDI_PCRS)  # type: ignore[arg-type]
        return KeyBinding(attest, signature, ak_public).encode()
    except Exception:  # stage events are a report, never a reason not to boot
        return None


def device_id(tpm: device.Tpm) -> str:
    """This device's id in the signed registry: that of its enrolled AK (the persistent one, else
    the primary AK the same template gives), which is how the factory registered it."""
    from cidboot.trust.tpm.commands import AK_HANDLE
    from cidboot.trust.tpm.evidence import device_id as ak_device_id
    from cidboot.trust.tpm.quote import parse_public

    public = tpm.read_public(AK_HANDLE)
    if public is None:
        handle, public = tpm.create_primary_ak()
        tpm.flush(handle)
    return ak_device_id(parse_public(public).name)


def event_lines(manifest_cid: CID, manifest: Manifest) -> list[tuple[str, CID, bytes]]:
    """(kind, CID, event data) for every event, in order: the data is what reference.bootstrap_events expects."""
    from cidboot.trust.tpm.reference import bootstrap_event_data

    cids = [manifest_cid] + [layer.cid for layer in manifest.layers]
    kinds = ["manifest"] + ["layer"] * len(manifest.layers)
    data = bootstrap_event_data(manifest_cid, (layer.cid for layer in manifest.layers))
    return list(zip(kinds, cids, data, strict=True))


def measure(root: TpmRoot, manifest_cid: CID, manifest: Manifest) -> dict[str, Any]:
    """Step 2: extend PCR 15; the boot.json "tpm" object the agent quotes with."""
    if root.extended:
        raise StageRefused("tpm", f"PCR {BOOTSTRAP_PCR} was already extended for this boot: only a power cycle "
                                  f"or reboot resets it, so reboot the device to try again")
    root.extended = True
    events = []
    try:
        with _open(root.device_paths) as tpm:
            for kind, cid, data in event_lines(manifest_cid, manifest):
                digests = tpm.extend(BOOTSTRAP_PCR, data, root.banks)
                events.append({"kind": kind, "cid": str(cid), "sha256": digests[ALG_SHA256].hex()})
    except (CidbootError, OSError) as e:
        raise StageRefused("tpm", f"extending PCR {BOOTSTRAP_PCR}: {type(e).__name__}: {e}") from None
    return {"pcr": BOOTSTRAP_PCR, "uefi_log": base64.b64encode(root.uefi_log).decode(), "events": events}

