"""Talking to a TPM 2.0: /dev/tpmrm0 in a boot stage, swtpm over TCP in tests and enrolment.

`Tpm(transport)` sends the raw commands of `commands` and parses their responses; what the boot
stages need is a handful of operations:

- `event_log()`: the firmware's crypto-agile log (Linux: securityfs binary_bios_measurements);
- `extend(pcr, data)`: extend every bank of the log with the hash of `data` (the bootstrap's
  PCR 15 events);
- `cdi(label, pcrs)`: HMAC by a primary keyedhash key whose policy is PolicyPCR over the current
  values of `pcrs`: the TPM-bound CDI_1 (docs/tpm.md, "The TPM-bound CDI");
- `quote(qualifying, pcrs)`: by the enrolled AK (persistent AK_HANDLE, else the primary AK).

Stdlib only: the bootstrap and agent images carry it (tests/unit/test_guest_imports.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from cidboot.trust.tpm import commands as c
from cidboot.trust.tpm.commands import TpmResponseError
from cidboot.trust.tpm.eventlog import ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, parse

DEVICES = ("/dev/tpmrm0", "/dev/tpm0")  # the kernel's resource manager first: several users, no handle leaks
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
_HASHES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}


class TpmUnavailable(TpmResponseError):
    """No TPM to talk to (no device node, or it does not answer)."""


class Transport(Protocol):
    def transmit(self, command: bytes) -> bytes: ...

    def close(self) -> None: ...


class DeviceTransport:
    """A TPM character device: one write of a whole command, one read of the whole response."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise TpmUnavailable(f"{self.path}: {e.strerror}") from None

    def transmit(self, command: bytes) -> bytes:
        os.write(self.fd, command)
        return os.read(self.fd, c.MAX_RESPONSE)

    def close(self) -> None:
        os.close(self.fd)


class SocketTransport:
    """swtpm's TCP data channel (`swtpm socket --server type=tcp`): raw commands, no framing."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout)
        except OSError as e:
            raise TpmUnavailable(f"swtpm at {host}:{port}: {e}") from None

    def transmit(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        head = self._read(10)
        (size,) = struct.unpack_from(">I", head, 2)
        if not 10 <= size <= c.MAX_RESPONSE:
            raise TpmResponseError(f"swtpm: response size {size}")
        return head + self._read(size - 10)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise TpmUnavailable("swtpm closed the connection")
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


def open_device(paths: Iterable[str] = DEVICES) -> Tpm:
    """The TPM of this machine, or TpmUnavailable."""
    for p in paths:
        if os.path.exists(p):
            return Tpm(DeviceTransport(p))
    raise TpmUnavailable(f"no TPM device ({', '.join(paths)})")


def present(paths: Iterable[str] = DEVICES) -> bool:
    return any(os.path.exists(p) for p in paths)


class Tpm:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.close()

    def run(self, command: bytes, what: str) -> bytes:
        """Send one command; TPM_RC_RETRY/YIELDED/TESTING are retried a few times. Returns the raw
        response (the caller's parser checks rc)."""
        for attempt in range(20):
            resp = self.transport.transmit(command)
            rc = struct.unpack_from(">I", resp, 6)[0] if len(resp) >= 10 else 0
            if rc not in c.RC_RETRY:
                return resp
            time.sleep(min(0.05 * (attempt + 1), 0.5))
        raise TpmResponseError(f"{what}: the TPM kept answering retry", rc)

    # -- keys ----------------------------------------------------------------------------------
    def flush(self, handle: int) -> None:
        c.ok(self.run(c.flush_context(handle), "TPM2_FlushContext"), "TPM2_FlushContext")

    def create_primary_ak(self) -> tuple[int, bytes]:
        """(transient handle, TPM2B_PUBLIC) of the primary AK (same key every time on this TPM)."""
        return c.parse_create_primary(self.run(c.create_primary_ak(), "TPM2_CreatePrimary"))

    def read_public(self, handle: int) -> bytes | None:
        """The TPM2B_PUBLIC of a loaded or persistent object; None if the handle holds nothing."""
        try:
            return c.parse_read_public(self.run(c.read_public(handle), "TPM2_ReadPublic"))
        except TpmResponseError as e:
            if e.rc is None:
                raise
            return None

    def persist_ak(self, handle: int = c.AK_HANDLE) -> bytes:
        """Enrolment: make the primary AK persistent at `handle` (idempotent); its TPM2B_PUBLIC."""
        existing = self.read_public(handle)
        if existing is not None:
            return existing
        transient, public = self.create_primary_ak()
        try:
            c.ok(self.run(c.evict_control(transient, handle), "TPM2_EvictControl"), "TPM2_EvictControl")
        finally:
            self.flush(transient)
        return public

    def quote(self, qualifying: bytes, pcrs: Iterable[int], ak_handle: int = c.AK_HANDLE) -> tuple[bytes, bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE, AK TPM2B_PUBLIC) of a quote over sha256:`pcrs` by the
        persistent AK at `ak_handle`; without one, by the (transient) primary AK."""
        public = self.read_public(ak_handle)
        if public is not None:
            attest, sig = c.parse_quote(self.run(c.quote(ak_handle, qualifying, pcrs), "TPM2_Quote"))
            return attest, sig, public
        handle, public = self.create_primary_ak()
        try:
            attest, sig = c.parse_quote(self.run(c.quote(handle, qualifying, pcrs), "TPM2_Quote"))
        finally:
            self.flush(handle)
        return attest, sig, public

    def ek_public(self) -> bytes:
        """The TPM2B_PUBLIC of the EK (CreatePrimary(endorsement, EK_TEMPLATE): what its certificate certifies)."""
        handle, public = c.parse_create_primary(self.run(c.create_primary(c.RH_ENDORSEMENT, c.EK_TEMPLATE),
                                                         "TPM2_CreatePrimary"))
        self.flush(handle)
        return public

    def activate_credential(self, credential_blob: bytes, secret: bytes, ak_handle: int = c.AK_HANDLE) -> bytes:
        """Enrolment's device side of make/activate credential: the EK (recreated from EK_TEMPLATE)
        decrypts the seed, the TPM checks the credential is bound to the name of the AK at
        `ak_handle` and returns the secret (TpmResponseError with the TPM's rc otherwise)."""
        ek, _ = c.parse_create_primary(self.run(c.create_primary(c.RH_ENDORSEMENT, c.EK_TEMPLATE), "TPM2_CreatePrimary"))
        try:
            session = c.parse_start_session(self.run(c.start_policy_session(os.urandom(16)), "TPM2_StartAuthSession"))
            try:
                c.ok(self.run(c.policy_secret(c.RH_ENDORSEMENT, session), "TPM2_PolicySecret"), "TPM2_PolicySecret")
                resp = self.run(c.activate_credential(ak_handle, ek, session, credential_blob, secret),
                                "TPM2_ActivateCredential")
            except BaseException:
                with contextlib.suppress(TpmResponseError, OSError):
                    self.flush(session)
                raise
            try:
                return c.parse_activate_credential(resp)
            except TpmResponseError:
                with contextlib.suppress(TpmResponseError, OSError):
                    self.flush(session)  # a failed command leaves the session loaded
                raise
        finally:
            self.flush(ek)

    def nv_read(self, index: int, chunk: int = 512) -> bytes:
        """A whole NV index (e.g. the EK certificate at 0x01C00002), read by the owner in chunks."""
        size = c.parse_nv_size(self.run(c.nv_read_public(index), "TPM2_NV_ReadPublic"))
        out = b""
        while len(out) < size:
            out += c.parse_nv_read(self.run(c.nv_read(index, min(chunk, size - len(out)), len(out)), "TPM2_NV_Read"))
        return out

    # -- PCRs ----------------------------------------------------------------------------------
    def pcr_values(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        """Current SHA-256 values (one read per 8 PCRs: TPML_DIGEST's maximum)."""
        order = sorted(set(pcrs))
        out: dict[int, bytes] = {}
        for i in range(0, len(order), 8):
            part = order[i:i + 8]
            values = c.parse_pcr_read(self.run(c.pcr_read(part), "TPM2_PCR_Read"))
            if len(values) != len(part):
                raise TpmResponseError(f"TPM2_PCR_Read: {len(values)} values for PCRs {part}")
            out.update(zip(part, values, strict=True))
        return out

    def extend(self, pcr: int, data: bytes, banks: Iterable[int] = (ALG_SHA256,)) -> dict[int, bytes]:
        """Extend `pcr` in each bank by the hash of `data`; returns the digests (TPM_ALG_ID -> digest)."""
        digests = {alg: hashlib.new(_HASHES[alg], data).digest() for alg in banks}
        c.ok(self.run(c.pcr_extend(pcr, digests), "TPM2_PCR_Extend"), "TPM2_PCR_Extend")
        return digests

    # -- the PCR-bound HMAC key ----------------------------------------------------------------
    def cdi(self, label: bytes, pcrs: Iterable[int]) -> bytes:
        """HMAC-SHA256(K, label) by the TPM, where K is the owner-hierarchy primary keyedhash key
        whose policy is PolicyPCR over the *current* values of `pcrs`: a key that only exists, and
        can only be used, while those PCRs hold these values (docs/tpm.md, "The TPM-bound CDI")."""
        order = sorted(set(pcrs))
        policy = c.policy_pcr_digest(self.pcr_values(order))
        key, _ = c.parse_create_primary(self.run(c.create_primary(c.RH_OWNER, c.cdi_key_template(policy)),
                                                 "TPM2_CreatePrimary (CDI key)"))
        try:
            session = c.parse_start_session(self.run(c.start_policy_session(os.urandom(16)), "TPM2_StartAuthSession"))
            try:
                c.ok(self.run(c.policy_pcr(session, order), "TPM2_PolicyPCR"), "TPM2_PolicyPCR")
                out = c.parse_hmac(self.run(c.hmac(key, session, label), "TPM2_HMAC"))
            except BaseException:
                with contextlib.suppress(TpmResponseError, OSError):
                    self.flush(session)  # a successful HMAC flushed it (continueSession clear)
                raise
        finally:
            self.flush(key)
        return out


def event_log(path: str | Path = EVENT_LOG) -> bytes:
    """The firmware's event log as the kernel exposes it (securityfs must be mounted)."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TpmUnavailable(f"{path}: {e.strerror}") from None


def log_banks(log: bytes) -> tuple[int, ...]:
    """The banks (TPM_ALG_IDs) a firmware log declares: the bootstrap extends and records all of them."""
    return tuple(alg for alg, _ in parse(log).spec_id.algorithms)

