"""Fetch, verify and measure the image a boot config names: the bootstrap's whole decision.

Order matters, so that nothing big is fetched before it is known to be wanted and nothing
unverified is ever handed on:

1. the manifest block alone (`?format=raw`, hashed against its CID), gateways in order;
2. the signed manifest against the trust anchor built into this image (threshold, expiry) and
   the rollback state from NVRAM (cidboot.trust.manifest.verify_manifest, not yet persisted): the
   manifest must have the name this device may boot (its role's manifest in the signed device
   registry when the boot config names one, else the name pinned in NVRAM), a version no lower
   than the highest accepted, and at that same version the same CID (docs/trust.md);
3. each layer: its root block first, so a declared size above the manifest's bound is refused
   before the rest is fetched (check_layer), then the DAG through cidboot.store.gateway.client.fetch
   as one CAR into RAM (every block hashed once, as it arrives; a lying gateway is dropped, the
   next one tried), then the exact bytes checked again. The kernel layer stops after its root
   block when it is the running kernel (a plain layer: its CID is /etc/cidboot/kernel.cid; an
   encrypted one: its signed plaintext SHA-256 is /etc/cidboot/kernel.sha256; both in this image's
   measured initrd) and the same-kernel hand-over will be taken: those bytes are already running,
   and what is measured (the manifest, which names the CID) does not change (docs/boot-chain.md,
   "Not fetching the running kernel"). Likewise the runtime layer, on that same-kernel path,
   when it is this image's own (/etc/cidboot/runtime.json: a plain layer by CID, an encrypted
   one by its signed plaintext SHA-256) and the initramfs begins with it: the hand-over keeps
   the running runtime's files (`reuses_running_runtime`, "Keeping the running runtime");
4. measure (cidboot.trust.measure.image_inputs) and derive CDI_2 + the L2 certificate from CDI_1;
   a manifest with encrypted layers (docs/privacy.md) then needs their keys: the bootstrap asks the
   key broker the boot config names (`keys`) with the evidence the agent will give, signed with the
   L2 alias key derived from CDI_2 (`cidboot.trust.attester`, the agent's own code), whose nonce
   binds the broker's challenge and an ephemeral X25519 key; it decrypts the layers in RAM and
   checks each against the manifest's plaintext hash (`unlock`). No keys, no boot: the refusal
   names the broker's failing check. An unencrypted manifest never asks a broker;
5. persist the new rollback state, and return a `BootPlan`; kexec is the caller's last step.

Every failure is a `Refused(check, detail)` whose detail names the CID, printed by main as
`cidboot: refused: <check>: <detail>`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.stage.nvram import Nvram, NvramError
from cidboot.errors import CidbootError, FormatError
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.netboot.bootconfig import BootConfig
from cidboot.stage.console import StageRefused, wipe
from cidboot.stage.handoff import Handoff
from cidboot.store.blockstore import AnyStore, MemoryBlockstore
from cidboot.store.gateway import client as gateway_client
from cidboot.trust import cose
from cidboot.trust.manifest import (
    ExpiredError,
    Manifest,
    ManifestNameError,
    ManifestVerificationError,
    RegistryRollbackError,
    RollbackError,
    RootOfTrust,
    SignedManifest,
    TrustState,
    VersionConflictError,
    check_layer,
    rotated_root,
    verify_manifest_signers,
)
from cidboot.trust.manifest.signed import MAX_ENVELOPE
from cidboot.trust.manifest.verify import utc

TRUST_ANCHOR = "/etc/cidboot/trust-anchor.json"


Refused = StageRefused  # check names what failed (e.g. "layer bafy...", "rollback"), detail says why


RUNNING_KERNEL_CID = "/etc/cidboot/kernel.cid"  # the CID of the kernel layer this image was built with
RUNNING_KERNEL_SHA256 = "/etc/cidboot/kernel.sha256"  # that layer's SHA-256 (an encrypted layer's plaintext hash)


SHA256_SAMPLE = 4 << 20  # bytes of ciphertext hashed as the reference figure of a private boot
# pauses between key requests when the broker is unreachable or answers with an error (never after
# a refusal): a TPM boot cannot simply try the whole boot again (PCR 15 is extended once per power-on)
KEY_RETRY_PAUSES = (2.0, 5.0)


@dataclass
class BootPlan:
    """What to hand over: verified kernel and initrd, the manifest's command line, and the
    hand-off (CDI_2 + chain [.., cert L2] for a measured boot). `kernel` is None when the
    manifest's kernel layer is the running kernel (by CID) and the hand-over is same-kernel:
    its bytes were not fetched (`kernel_cid` names them if a kexec turns out to be needed)."""

    manifest_cid: CID
    manifest: Manifest
    signers: list[bytes]
    kernel: bytes | None
    initrd: bytes
    cmdline: str
    handoff: Handoff
    timings: dict[str, float] = field(default_factory=dict)
    kernel_cid: CID | None = None
    unlocked: Unlocked | None = None  # a manifest with encrypted layers: what getting and using the keys cost
    # an encrypted kernel layer left unfetched (the running kernel): its key, kept for the late kexec
    # fallback (main.same_kernel) only; the running kernel's plaintext is no secret from this device
    kernel_key: bytes | None = None
    # the runtime layer left unfetched (the running one, kept by the hand-over): `initrd` is then the
    # layers after it; its CID and (encrypted) key for the late fallback (fetch_left_out)
    runtime_cid: CID | None = None
    runtime_key: bytes | None = None


class Unlocked:
    """What `unlock` did, for the console: how many layers and bytes, the time the broker took,
    and decryption (STREAM + the plaintext SHA-256 check) against a SHA-256 pass over the same
    ciphertext (a sample of it), which is what the CID check of those bytes costs (docs/privacy.md).
    A plain record (a frozen dataclass costs ~3 M guest instructions at the stage's import)."""

    __slots__ = ("layers", "ciphertext_bytes", "broker_seconds", "decrypt_seconds", "sha256_seconds", "sha256_bytes")

    def __init__(self, layers: int, ciphertext_bytes: int, broker_seconds: float, decrypt_seconds: float,
                 sha256_seconds: float, sha256_bytes: int) -> None:
        self.layers = layers
        self.ciphertext_bytes = ciphertext_bytes
        self.broker_seconds = broker_seconds
        self.decrypt_seconds = decrypt_seconds
        self.sha256_seconds = sha256_seconds
        self.sha256_bytes = sha256_bytes  # the reference hashes a sample (SHA256_SAMPLE) of the ciphertext

    def line(self) -> str:
        def rate(n: int, sec: float) -> str:
            return f"{n / sec / 2**20:.1f}" if sec > 0 else "inf"

        return (f"layers={self.layers} bytes={self.ciphertext_bytes} broker_s={self.broker_seconds:.3f} "
                f"decrypt_s={self.decrypt_seconds:.3f} sha256_bytes={self.sha256_bytes} sha256_s={self.sha256_seconds:.3f} "
                f"decrypt_mibps={rate(self.ciphertext_bytes, self.decrypt_seconds)} "
                f"sha256_mibps={rate(self.sha256_bytes, self.sha256_seconds)}")


def running_kernel_cid(path: str | Path = RUNNING_KERNEL_CID) -> CID | None:
    """The kernel layer CID the image builder recorded for this image's kernel, or None."""
    try:
        return CID.parse(Path(path).read_text().strip())
    except (OSError, FormatError, ValueError):
        return None


def running_kernel_sha256(path: str | Path = RUNNING_KERNEL_SHA256) -> bytes | None:
    """The SHA-256 of the kernel layer the image builder recorded for this image's kernel, or None."""
    try:
        digest = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return digest if len(digest) == 32 else None


def reuses_running_kernel(manifest: Manifest, running: CID | None, running_cmdline: str | None,
                          running_sha256: bytes | None = None) -> bool:
    """Whether the manifest's kernel layer is the running kernel and the next stage can start in
    it (cidboot.stage.switch_root.decide's rule, by what identifies the bytes instead of by the
    fetched bytes' SHA-512): a plain layer by its CID (multihash compared with `running`, the
    running image's kernel.cid); an encrypted layer, whose CID is its ciphertext's, by the
    signed plaintext SHA-256 (compared with `running_sha256`, the running image's kernel.sha256);
    and every kernel parameter the manifest asks for in effect. Callers pass None for both when a
    kexec is forced."""
    import hmac

    from cidboot.stage.switch_root import kernel_params

    if running_cmdline is None:
        return False
    kernels = [lyr for lyr in manifest.layers if lyr.role == "kernel"]
    if len(kernels) != 1:
        return False
    k = kernels[0]
    if k.plaintext is None:
        same = running is not None and k.cid.multihash == running.multihash
    else:
        same = running_sha256 is not None and hmac.compare_digest(k.plaintext.sha256, running_sha256)
    return same and kernel_params(manifest.cmdline) <= kernel_params(running_cmdline)


def reuses_running_runtime(manifest: Manifest, runtime: Any) -> bool:
    """Whether the manifest's runtime layer is this image's own runtime layer (`runtime`, a
    cidboot.stage.switch_root.Runtime from /etc/cidboot/runtime.json, in this stage's measured
    initrd) and the initramfs begins with it, so the hand-over can keep the running files instead
    of fetching the layer: a plain layer by its CID (codec and multihash equal to runtime.json's
    cid) and size; an encrypted one, whose CID is its ciphertext's, by its signed plaintext
    SHA-256 and size. Call it only when the kernel is the running one too (the same-kernel path:
    `reuses_running_kernel`, no kexec forced); None: no reuse."""
    import hmac

    if runtime is None:
        return False
    initramfs = [lyr for lyr in manifest.layers if lyr.role != "kernel"]
    runtimes = [lyr for lyr in initramfs if lyr.role == "runtime"]
    if len(runtimes) != 1 or initramfs[0] is not runtimes[0]:
        return False
    r = runtimes[0]
    if r.plaintext is None:
        try:
            cid = CID.parse(runtime.cid)
        except (FormatError, ValueError):
            return False
        return cid.codec == r.cid.codec and cid.multihash == r.cid.multihash and r.size == runtime.size
    return hmac.compare_digest(r.plaintext.sha256, runtime.sha256) and r.plaintext.size == runtime.size


def load_anchor(path: str | Path = TRUST_ANCHOR) -> RootOfTrust:
    from cidboot.trust.keys import KeyFileError, load_root

    try:
        return load_root(path)
    except (KeyFileError, FormatError) as e:
        raise Refused("trust anchor", str(e)) from None


def fetch_block(cid: CID, gateways: list[str] | tuple[str, ...], store: AnyStore, *, timeout: float = 10.0,
                max_size: int = MAX_ENVELOPE, rounds: int = 3, backoff: float = 0.5) -> bytes:
    """cidboot.store.gateway.client.fetch_block, its failure as a refusal naming the CID."""
    try:
        return gateway_client.fetch_block(cid, gateways, store, timeout=timeout, max_size=max_size, rounds=rounds,
                                          backoff=backoff, user_agent="cidboot-bootstrap")
    except gateway_client.BlockUnavailable as e:
        raise Refused(f"block {cid}", str(e)) from None


def verify_signed(cid: CID, raw: bytes, state: TrustState, *, now: int | None = None,
                  expected_name: str | None = None) -> tuple[SignedManifest, list[bytes]]:
    """Decode and verify the signed manifest against `state` (not persisted); returns it and the
    key ids (bytes) of the trusted keys whose signatures verified. `expected_name`: the manifest
    name the signed device registry gives this device (None: the name pinned in `state`)."""
    what = f"manifest {cid}"
    if cid.codec != DAG_CBOR:
        raise Refused(what, "is not a DAG-CBOR block")
    try:
        signed = SignedManifest.decode(raw)
    except FormatError as e:
        raise Refused(what, f"malformed: {e}") from None
    m = signed.manifest
    seen = state.highest.get(m.name)
    try:
        _, signers = verify_manifest_signers(signed, state, now=now, persist=False, cid=cid, expected_name=expected_name)
    except ManifestNameError as e:
        raise Refused("manifest name", str(e)) from None
    except VersionConflictError as e:
        raise Refused("rollback", str(e)) from None
    except RollbackError:
        raise Refused("rollback", f"manifest {cid} ({m.name}) version {m.version} < {seen} already booted") from None
    except ExpiredError:
        now_s = int(time.time()) if now is None else now
        raise Refused("expiry", f"manifest {cid} ({m.name} v{m.version}) expired at {utc(m.expires)}, "
                                f"now {utc(now_s)}") from None
    except ManifestVerificationError as e:
        untrusted = _untrusted_kids(signed, state.root)
        if untrusted:
            kids = ", ".join(untrusted)
            raise Refused(what, f"signed by unknown key {kids} (not in the trust anchor): {e}") from None
        raise Refused(what, str(e)) from None
    return signed, [bytes.fromhex(k) for k in signers]


class AllowedName:
    """The manifest name the signed device registry lets this device boot, and that registry's
    version (recorded in NVRAM once the boot is accepted, so an older registry cannot be replayed).
    A plain record, as `Unlocked`."""

    __slots__ = ("name", "registry", "version")

    def __init__(self, name: str, registry: CID, version: int) -> None:
        self.name = name
        self.registry = registry
        self.version = version


def allowed_name(config: BootConfig, cid: CID, raw: bytes, state: TrustState, dice: bytes | None, *, boot_mode: str,
                 store: AnyStore, timeout: float = 10.0, device_id: str | None = None) -> AllowedName | None:
    """With `device_registry` in the boot config: fetch it, verify it under the root the manifest
    establishes (after any rotation it carries), and look this device up: by the DICE ID of its
    chain's root key on a measured boot (its registered role must equal the boot config's), by the
    boot config's role on an unmeasured one (no identity to look up); `device_id` given (a TPM
    boot: the id of its enrolled AK, bootstrap.stage.tpm) is used as is. None without a registry:
    the name pinned in NVRAM then applies (docs/trust.md, "What a device may boot")."""
    if config.device_registry is None:
        return None
    # only now: the registry module pulls in cidboot.trust.appraisal (~40 M guest instructions of
    # imports), which a boot config without a registry never needs
    from cidboot.trust.registry import MAX_REGISTRY, RegistryRoleError, verify_signed_registry

    rcid = config.device_registry
    try:
        signed = SignedManifest.decode(raw)
        root, _ = rotated_root(signed, state.root)
    except FormatError as e:
        raise Refused(f"manifest {cid}", f"malformed: {e}") from None
    except ManifestVerificationError as e:
        raise Refused(f"manifest {cid}", str(e)) from None
    try:
        block = fetch_block(rcid, config.gateways, store, timeout=timeout, max_size=MAX_REGISTRY)
    except Refused as e:
        raise Refused("registry", f"device registry {rcid}: {e.detail}") from None
    try:
        reg = verify_signed_registry(block, root)
        device = device_id or (_device_id(dice) if boot_mode == "measured" else None)
        name = reg.manifest_for(config.role, device)
    except (CidbootError, ValueError) as e:
        kind = "" if isinstance(e, RegistryRoleError) else f"{type(e).__name__}: "
        raise Refused("registry", f"device registry {rcid}: {kind}{e}") from None
    return AllowedName(name, rcid, reg.version)


def _device_id(dice: bytes | None) -> str:
    """The DICE ID (hex) of the root key of the chain the firmware handed over: the device's
    identity, as the registry lists it."""
    from cidboot.trust.cose_key import decode_public_key, raw_public_bytes
    from cidboot.trust.dice import decode_handover
    from cidboot.trust.dice.derive import derive_id

    if dice is None:
        raise Refused("registry", "a measured boot without a DICE hand-off cannot be looked up in the device registry")
    h = decode_handover(dice)
    wipe(h.cdi_attest)
    wipe(h.cdi_seal)
    items = cose.cbor_loads_exact(h.chain, "DICE chain")
    if not isinstance(items, list) or not items:
        raise Refused("registry", "the DICE chain from the firmware is empty")
    return derive_id(raw_public_bytes(decode_public_key(items[0]))).hex()


def _untrusted_kids(signed: SignedManifest, root: RootOfTrust) -> list[str]:
    """Key ids (hex) of signatures by keys the trusted root does not hold."""
    try:
        msg = cose.decode_sign(signed.signatures)
    except FormatError:
        return []
    trusted = root.public_keys()
    return [s.kid.hex() for s in msg.signatures if s.kid is not None and s.kid not in trusted]


def fetch_layer(manifest: Manifest, cid: CID, gateways: list[str] | tuple[str, ...], store: AnyStore, *,
                timeout: float = 10.0, root_only: bool = False) -> bytes | None:
    """One layer's verified bytes: root block, size bound, whole DAG, exact size. With
    `root_only`, stop after the size checks of the root block and return None (the running
    kernel: its bytes are not needed)."""
    from cidboot.ipld.unixfs.exporter import export_file, file_size
    from cidboot.store.gateway.client import AllGatewaysFailed, fetch

    what = f"layer {cid}"
    try:
        fetch_block(cid, gateways, store, timeout=timeout, max_size=4 * 1024 * 1024)
    except Refused as e:
        raise Refused(what, e.detail) from None
    try:
        declared = file_size(cid, store.get)
        check_layer(manifest, cid, declared)
    except ManifestVerificationError as e:
        raise Refused(what, str(e)) from None
    except (FormatError, KeyError) as e:
        raise Refused(what, f"not a UnixFS file: {e}") from None
    if root_only:
        layer = manifest.layer(cid)
        if layer is not None and declared != layer.size:
            raise Refused(what, f"declares {declared} bytes, the manifest lists {layer.size}")
        return None
    try:
        fetch(cid, list(gateways), store, timeout=timeout)
    except AllGatewaysFailed as e:
        kind = "hash mismatch" if e.lied else "unavailable"
        raise Refused(what, f"{kind}: {e}") from None
    try:
        data = b"".join(export_file(cid, store.get))
        check_layer(manifest, cid, len(data))
    except ManifestVerificationError as e:
        raise Refused(what, str(e)) from None
    except (FormatError, KeyError) as e:
        raise Refused(what, f"not a UnixFS file: {e}") from None
    layer = manifest.layer(cid)
    if layer is not None and len(data) != layer.size:
        raise Refused(what, f"is {len(data)} bytes, the manifest lists {layer.size}")
    return data


def fetch_left_out(manifest: Manifest, cid: CID, gateways: list[str] | tuple[str, ...], key: bytes | None, *,
                   timeout: float = 10.0) -> bytes:
    """A layer `prepare` left unfetched because it is running (the kernel, the runtime), fetched
    now that a fallback needs its bytes after all (a kexec): every block verified, an encrypted
    layer decrypted with the key kept for it and checked against its signed plaintext hash."""
    from cidboot.store.blockstore import MemoryBlockstore

    data = fetch_layer(manifest, cid, gateways, MemoryBlockstore(), timeout=timeout)
    assert data is not None
    layer = manifest.layer(cid)
    if layer is None or layer.plaintext is None:
        return data
    from cidboot.trust.private.keys import decrypt_layer

    if key is None:
        raise Refused("decrypt", f"{layer.role} layer {cid}: encrypted, and no key was kept for it")
    try:
        return b"".join(decrypt_layer(key, [data], sha256=layer.plaintext.sha256, size=layer.plaintext.size))
    except CidbootError as e:
        raise Refused("decrypt", f"{layer.role} layer {cid}: {type(e).__name__}: {e}") from None


def measure(dice: bytes, manifest_cid: CID, manifest: Manifest, signers: list[bytes]) -> bytes:
    """CDI_1 handover -> CDI_2 handover: DICE main flow over the image's inputs, the L2
    certificate appended to the chain. Wipes the decoded CDI_1 copies."""
    from cidboot.trust.dice import append_to_chain, decode_handover, encode_handover, main_flow
    from cidboot.trust.dice.chain import HandoverError
    from cidboot.trust.measure import image_inputs

    try:
        h = decode_handover(dice)
    except HandoverError as e:
        raise Refused("dice", f"hand-off from the previous stage: {e}") from None
    try:
        a2, s2, cert = main_flow(h.cdi_attest, h.cdi_seal, image_inputs(manifest_cid, manifest, signers))
    finally:
        wipe(h.cdi_attest)
        wipe(h.cdi_seal)
    out = encode_handover(a2, s2, append_to_chain(h.chain, cert))
    wipe(a2)
    wipe(s2)
    return out


def assemble(manifest: Manifest, blobs: dict[str, bytes | None], manifest_cid: CID) -> tuple[bytes | None, bytes]:
    """(kernel, initrd): the one kernel layer (None when not fetched: the running kernel), and the
    other layers concatenated in manifest order (the kernel unpacks concatenated cpio archives,
    docs/images.md)."""
    kernels = [lyr for lyr in manifest.layers if lyr.role == "kernel"]
    if len(kernels) != 1:
        raise Refused(f"manifest {manifest_cid}", f"has {len(kernels)} kernel layers, needs exactly one")
    parts = [blobs[str(lyr.cid)] for lyr in manifest.layers if lyr.role != "kernel"]
    initrd = b"".join(p for p in parts if p is not None)
    return blobs[str(kernels[0].cid)], initrd


def encrypted_layers(manifest: Manifest) -> list[str]:
    """CIDs of the manifest's encrypted layers (those with a plaintext hash)."""
    return [str(lyr.cid) for lyr in manifest.layers if lyr.plaintext is not None]


def key_evidence(next_dice: bytes | None, dice: bytes | None, cid: CID, role: str, *,
                 tpm_boot: dict[str, Any] | None = None, tpm_paths: tuple[str, ...] | None = None) -> Callable[[bytes], bytes]:
    """nonce -> the evidence the bootstrap asks the key broker with: exactly what the agent will
    give (`cidboot.trust.attester`, the one code): signed by the L2 alias key of CDI_2 with the
    chain ending in the L2 certificate on a measured boot; on a TPM-rooted one (`tpm_boot`: the
    boot.json "tpm" object, PCR 15 already extended with this manifest) with a fresh quote by the
    enrolled AK over SHA-256(nonce || L1 key), the agent's `TpmQuoter`; on an unmeasured boot (no
    CDI_2 is carried) by the ephemeral identity's key with boot mode "unmeasured", which the
    broker's appraisal refuses as it would the agent's."""
    from cidboot.trust.attester import evidence_from_handover

    what = f"manifest {cid} has encrypted layers"
    if tpm_boot is not None:
        if next_dice is None:
            raise Refused("keys", f"{what}, and this TPM-rooted boot derived no CDI_2 to ask the key broker with")
        from cidboot.trust.dice import decode_handover
        from cidboot.trust.tpm.quoter import TpmQuoter

        h = decode_handover(next_dice)
        wipe(h.cdi_attest)
        wipe(h.cdi_seal)
        try:
            quoter = TpmQuoter.from_boot({"tpm": tpm_boot}, h.chain, *(() if tpm_paths is None else (tpm_paths,)))
            ueid = quoter.ueid()
        except (CidbootError, OSError) as e:
            raise Refused("keys", f"{what}: the TPM cannot quote for the key request: {type(e).__name__}: {e}") from None
        return evidence_from_handover(next_dice, manifest_cid=cid, role=role, tpm=quoter.evidence, ueid=ueid)
    if next_dice is not None:
        return evidence_from_handover(next_dice, manifest_cid=cid, role=role, boot_mode="measured")
    if dice is not None:
        return evidence_from_handover(dice, manifest_cid=cid, role=role, boot_mode="unmeasured")
    raise Refused("keys", f"{what}, and this boot has no identity to ask the key broker with")


def unlock(config: BootConfig, cid: CID, manifest: Manifest, blobs: dict[str, bytes | None],
           evidence: Callable[[bytes], bytes], *, timeout: float = 30.0
           ) -> tuple[dict[str, bytes | None], Unlocked, dict[str, bytes]]:
    """The layer keys from the key broker (`config.keys`), then every encrypted layer decrypted
    in RAM and checked against the manifest's plaintext SHA-256 and size: the blobs with
    plaintext in place of ciphertext, and the keys (by CID) of the encrypted layers left
    unfetched (a blob None: the running kernel, the running runtime), kept for a late kexec;
    every other key is dropped. Refusals:
    `keys` (no broker configured, unreachable, or it refused: its failing check named), `decrypt`
    (a layer that does not decrypt or whose plaintext is not the manifest's: the layer's CID
    named)."""
    import hashlib

    from cidboot.trust.private import client

    if config.keys is None:
        raise Refused("keys", f"manifest {cid} has encrypted layers and the boot config names no key broker "
                              f"(`keys`; bootstrap serve --key-policy or --keys)")
    t0 = time.monotonic()
    pauses = list(KEY_RETRY_PAUSES)
    while True:  # each try: a new challenge, a new ephemeral key, new evidence (a fresh quote)
        try:
            keys = client.request_keys(config.keys, evidence, cid, timeout=timeout)
            break
        except client.KeyBrokerRefused as e:  # an appraisal's verdict: asking again changes nothing
            raise Refused("keys", f"key broker {config.keys} refused the keys of manifest {cid}: "
                                  f"{e.check}: {e.reason}") from None
        except client.KeyBrokerUnavailable as e:
            if not pauses:
                tries = len(KEY_RETRY_PAUSES) + 1
                raise Refused("keys", f"no keys for manifest {cid}: {e} ({tries} tr{'ies' if tries > 1 else 'y'})") from None
            print(f"cidboot: bootstrap: keys: {e}: asking again in {pauses[0]:.0f} s", flush=True)
            time.sleep(pauses.pop(0))
        except CidbootError as e:  # a release for another manifest, or one that does not open
            raise Refused("keys", f"key release for manifest {cid}: {type(e).__name__}: {e}") from None
    t_broker = time.monotonic() - t0
    fetched = {c: b for c, b in blobs.items() if b is not None}
    enc = [c for c in encrypted_layers(manifest) if c in fetched]
    unfetched = frozenset(c for c, b in blobs.items() if b is None)
    t0 = time.monotonic()
    try:
        plain = client.decrypt_layers(manifest, fetched, keys, skip=unfetched)
        kept = {c: keys[c] for c in unfetched if c in keys}
    except CidbootError as e:  # each names the layer's CID and role (client.decrypt_layers)
        raise Refused("decrypt", f"{type(e).__name__}: {e}") from None
    finally:
        keys.clear()  # the keys are no use once the layers are open
    t_decrypt = time.monotonic() - t0
    # the reference: what hashing ciphertext once (the CID check) costs here, on a sample of at
    # most SHA256_SAMPLE bytes so that the figure costs the boot little
    sample = memoryview(fetched[max(enc, key=lambda c: len(fetched[c]))])[:SHA256_SAMPLE] if enc else memoryview(b"")
    t0 = time.monotonic()
    hashlib.sha256(sample).digest()
    t_sha = time.monotonic() - t0
    out: dict[str, bytes | None] = {c: plain.get(c) if b is not None else None for c, b in blobs.items()}
    return (out, Unlocked(len(enc), sum(len(fetched[c]) for c in enc), t_broker, t_decrypt, t_sha, len(sample)),
            kept)


def prepare(config: BootConfig, bootconfig_raw: bytes, dice: bytes | None, *, boot_mode: str, anchor: RootOfTrust,
            nvram: Nvram, store: AnyStore, now: int | None = None, timeout: float = 10.0,
            carry_dice: bool = True, running_kernel: CID | None = None,
            running_cmdline: str | None = None, device_id: str | None = None, tpm: Any = None,
            running_kernel_sha256: bytes | None = None, running_runtime: Any = None) -> BootPlan:
    """Steps 1-5 of the module docstring. `dice` is the handover holding CDI_1 (from the firmware,
    or an ephemeral one for an unmeasured boot); `carry_dice=False` leaves dice.cbor out of the
    hand-off (the unmeasured contract, docs/boot-chain.md). `running_kernel` (the running
    kernel's layer CID; None when a kexec is forced), `running_kernel_sha256` (that layer's
    SHA-256, for an encrypted kernel layer; None when a kexec is forced) and `running_cmdline`
    (/proc/cmdline) let the kernel layer go unfetched when it is the running kernel
    (reuses_running_kernel); `running_runtime` (this image's runtime.json as a
    cidboot.stage.switch_root.Runtime; None when a kexec is forced) lets the runtime layer go
    unfetched on that same-kernel path when it is this image's (reuses_running_runtime).
    `tpm` (a TPM-rooted boot's bootstrap.stage.tpm.TpmRoot): with encrypted layers, PCR 15 is
    extended here, before the key request whose quote must cover it (boot.json "tpm" is then set;
    otherwise the caller extends it after `prepare`)."""
    t: dict[str, float] = {}
    cid = config.manifest
    gws = config.gateways
    t0 = time.monotonic()
    try:
        state = nvram.load_state(anchor)
    except NvramError as e:
        raise Refused("nvram", f"{e} (booting manifest {cid} would lose rollback protection)") from None
    try:
        raw = fetch_block(cid, gws, store, timeout=timeout)
    except Refused as e:
        raise Refused(f"manifest {cid}", e.detail) from None
    allowed = allowed_name(config, cid, raw, state, dice, boot_mode=boot_mode, store=store, timeout=timeout,
                           device_id=device_id)
    signed, signers = verify_signed(cid, raw, state, now=now, expected_name=allowed.name if allowed else None)
    if allowed is not None:
        try:
            state.accept_registry(allowed.version, f"device registry {allowed.registry}")
        except RegistryRollbackError as e:
            raise Refused("registry", str(e)) from None
    m = signed.manifest
    t["manifest"] = time.monotonic() - t0
    t0 = time.monotonic()
    # a plain kernel layer is the running kernel by its CID, an encrypted one by its plaintext SHA-256
    reuse = reuses_running_kernel(m, running_kernel, running_cmdline, running_kernel_sha256)
    # and on that same-kernel path, the runtime layer when it is this image's own (kept by the hand-over)
    reuse_runtime = reuse and reuses_running_runtime(m, running_runtime)
    running_roles = {"kernel"} | ({"runtime"} if reuse_runtime else set())
    blobs: dict[str, bytes | None] = {}
    for lyr in m.layers:
        blobs[str(lyr.cid)] = fetch_layer(m, lyr.cid, gws, store, timeout=timeout,
                                          root_only=reuse and lyr.role in running_roles)
        if isinstance(store, MemoryBlockstore):
            store.clear()  # this layer's bytes are in `blobs`: its blocks need not stay in RAM too
    t["layers"] = time.monotonic() - t0
    t0 = time.monotonic()
    # an unmeasured hand-off carries no dice.cbor (docs/boot-chain.md): measuring would be wasted work
    next_dice = measure(dice, cid, m, signers) if dice is not None and carry_dice else None
    t["measure"] = time.monotonic() - t0
    unlocked = None
    kept_keys: dict[str, bytes] = {}
    tpm_boot: dict[str, Any] | None = None
    if encrypted_layers(m):  # keys only now: the evidence is signed with the key derived from CDI_2
        t0 = time.monotonic()
        if device_id is not None and tpm is None:
            raise Refused("keys", f"manifest {cid} has encrypted layers and this TPM-rooted boot has no TPM to quote with")
        if tpm is not None:  # PCR 15 first: the quote in the key request must cover this manifest
            from bootstrap.stage import tpm as stage_tpm

            tpm_boot = stage_tpm.measure(tpm, cid, m)
        try:
            evidence = key_evidence(next_dice, dice, cid, config.role, tpm_boot=tpm_boot,
                                    tpm_paths=tpm.device_paths if tpm is not None else None)
            blobs, unlocked, kept_keys = unlock(config, cid, m, blobs, evidence, timeout=max(timeout, 30.0))
        except Refused as e:
            if tpm is None:
                raise
            raise Refused(e.check, f"{e.detail} (PCR {tpm_boot['pcr'] if tpm_boot else 15} already holds this "
                                   f"boot's events: only a reboot lets this device ask again)") from None
        t["keys"] = time.monotonic() - t0
    kernel, initrd = assemble(m, blobs, cid)
    try:
        nvram.save_state(state)
    except NvramError as e:
        raise Refused("nvram", f"{e} (manifest {cid} not booted)") from None
    boot: dict[str, Any] = {"boot_mode": boot_mode, "bootconfig": bootconfig_raw.decode("utf-8", "replace"),
                            "manifest": str(cid)}
    if tpm_boot is not None:
        boot["tpm"] = tpm_boot
    handoff = Handoff(dice=next_dice, boot=boot)
    try:
        handoff.validate()
    except CidbootError as e:
        raise Refused("handoff", f"for manifest {cid}: {e}") from None
    kernel_cid = next(lyr.cid for lyr in m.layers if lyr.role == "kernel")
    runtime_cid = next((lyr.cid for lyr in m.layers if lyr.role == "runtime"), None) if reuse_runtime else None
    return BootPlan(cid, m, signers, kernel, initrd, m.cmdline, handoff, t, kernel_cid, unlocked,
                    kept_keys.get(str(kernel_cid)), runtime_cid,
                    kept_keys.get(str(runtime_cid)) if runtime_cid is not None else None)
