"""TPM 2.0 command marshalling: the few commands a boot stage and enrolment need, as bytes.

Raw commands (TPM 2.0 Library Part 3), not tpm2-pytss: the guest talks to /dev/tpmrm0 with a
dozen fixed structures, and the library's closure (cffi, libtss2-esys/-mu/-tctildr/-sys and their
OpenSSL and json-c) would add megabytes to a boot image for them (docs/tpm.md, "Why raw commands").
Pure functions, stdlib only: `device.Tpm` sends them over a transport; tests and enrolment can
send the same bytes to swtpm over TCP.

Every command here uses either no session or one session that needs no HMAC: a password session
with empty auth (TPM_RS_PW) or a policy session whose policy holds no PolicyAuthValue. That is
enough because nothing here is secret on the wire: the CDI key's use is gated by PCRs, not by a
password (see `cdi_key_template`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cidboot.trust.tpm.errors import TpmFormatError

# tags, handles, command codes, algorithms (Part 2)
ST_NO_SESSIONS, ST_SESSIONS = 0x8001, 0x8002
RH_OWNER, RH_NULL, RH_ENDORSEMENT, RS_PW = 0x40000001, 0x40000007, 0x4000000B, 0x40000009
CC_EVICT_CONTROL = 0x120
CC_CREATE_PRIMARY = 0x131
CC_HMAC = 0x155
CC_QUOTE = 0x158
CC_READ_PUBLIC = 0x173
CC_START_AUTH_SESSION = 0x176
CC_PCR_READ = 0x17E
CC_POLICY_PCR = 0x17F
CC_PCR_EXTEND = 0x182
CC_FLUSH_CONTEXT = 0x165
CC_NV_READ = 0x14E
CC_NV_READ_PUBLIC = 0x169
CC_ACTIVATE_CREDENTIAL = 0x147
CC_DA_LOCK_RESET = 0x139
CC_DA_PARAMETERS = 0x13A
CC_SHUTDOWN = 0x145
RH_LOCKOUT = 0x4000000A
SU_CLEAR = 0x0000
CC_POLICY_SECRET = 0x151
ALG_SHA1, ALG_HMAC, ALG_KEYEDHASH, ALG_SHA256, ALG_NULL = 0x0004, 0x0005, 0x0008, 0x000B, 0x0010
SE_POLICY = 0x01
RC_SUCCESS = 0
# response codes worth a retry: TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING
RC_RETRY = frozenset({0x922, 0x908, 0x90A})
MAX_RESPONSE = 4096  # TPM_MAX_COMMAND_SIZE of PC Client TPMs; every response here is far smaller

# object attributes (TPMA_OBJECT)
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
USER_WITH_AUTH, ADMIN_WITH_POLICY, NO_DA, RESTRICTED, SIGN = 1 << 6, 1 << 7, 1 << 10, 1 << 16, 1 << 18

_PW_SESSION = struct.pack(">IHBH", RS_PW, 0, 0, 0)  # TPM_RS_PW, no nonce, no attributes, empty auth
# An RSA-2048 restricted signing key, RSASSA/SHA-256 (what `tpm2_createak -G rsa -s rsassa` makes):
# a deterministic AK from the endorsement seed
AK_TEMPLATE = bytes.fromhex("0001" "000b" "00050072" "0000" "0010" "0014" "000b" "0800" "00000000" "0000")
# the persistent handle enrolment gives the AK (TCG "Provisioning Guidance": 0x81010000.. are the
# endorsement hierarchy's; 0x81010001 is the usual EK slot, so the AK takes the next)
AK_HANDLE = 0x81010002
# The EK of the TCG EK Credential Profile (2.3, template L-1): RSA-2048, AES-128-CFB storage key,
# adminWithPolicy with authPolicy = PolicySecret(TPM_RH_ENDORSEMENT), unique = 256 zero bytes. The
# EK certificate at NV 0x01C00002 certifies the key CreatePrimary(endorsement, EK_TEMPLATE) gives.
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
EK_TEMPLATE = (bytes.fromhex("0001" "000b" "000300b2") + struct.pack(">H", 32) + EK_POLICY
               + bytes.fromhex("0006" "0080" "0043" "0010" "0800" "00000000") + struct.pack(">H", 256) + bytes(256))
CDI_UNIQUE = hashlib.sha256(b"cidboot L1 CDI key").digest()  # names the key: another template user gets another key


class TpmResponseError(TpmFormatError):
    """A TPM response is malformed, or the TPM refused the command (the message carries its rc)."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


def pcr_select(pcrs: Iterable[int], alg: int = ALG_SHA256) -> bytes:
    """TPML_PCR_SELECTION with one bank and a 3-byte bitmap (PCR 0..23)."""
    bits = bytearray(3)
    for i in pcrs:
        if not 0 <= i < 24:
            raise ValueError(f"PCR {i} is not 0..23")
        bits[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, alg, 3) + bytes(bits)


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def command(cc: int, handles: bytes = b"", params: bytes = b"", *, auth: bytes | None = None) -> bytes:
    """A whole command: header, handles, the authorization area when `auth` is given, parameters."""
    if auth is None:
        body = handles + params
        tag = ST_NO_SESSIONS
    else:
        body = handles + struct.pack(">I", len(auth)) + auth + params
        tag = ST_SESSIONS
    return struct.pack(">HII", tag, 10 + len(body), cc) + body


def policy_auth(session: int) -> bytes:
    """One policy session in an authorization area, flushed after the command (continueSession clear)."""
    return struct.pack(">IHBH", session, 0, 0, 0)


@dataclass(frozen=True)
class Response:
    """A parsed response header: rc, and for sessioned commands the handles + parameter area split."""

    tag: int
    rc: int
    body: bytes  # everything after the 10-byte header


def parse_response(resp: bytes, what: str) -> Response:
    if len(resp) < 10:
        raise TpmResponseError(f"{what}: response of {len(resp)} bytes is shorter than its header")
    tag, size, rc = struct.unpack_from(">HII", resp)
    if size != len(resp):
        raise TpmResponseError(f"{what}: response says {size} bytes, got {len(resp)}")
    if rc != RC_SUCCESS:
        raise TpmResponseError(f"{what}: TPM returned rc {rc:#x}", rc)
    return Response(tag, rc, resp[10:])


def _params(r: Response, n_handles: int, what: str) -> tuple[list[int], bytes]:
    """(response handles, parameter bytes) of a successful response."""
    body = r.body
    if len(body) < 4 * n_handles:
        raise TpmResponseError(f"{what}: response too short for {n_handles} handle(s)")
    handles = [struct.unpack_from(">I", body, 4 * i)[0] for i in range(n_handles)]
    body = body[4 * n_handles:]
    if r.tag == ST_SESSIONS:
        if len(body) < 4:
            raise TpmResponseError(f"{what}: no parameterSize")
        (n,) = struct.unpack_from(">I", body)
        if n > len(body) - 4:
            raise TpmResponseError(f"{what}: parameterSize {n} exceeds the response")
        body = body[4:4 + n]
    return handles, body


def _take2b(data: bytes, off: int, what: str) -> tuple[bytes, int]:
    if off + 2 > len(data):
        raise TpmResponseError(f"{what}: truncated at offset {off}")
    (n,) = struct.unpack_from(">H", data, off)
    if off + 2 + n > len(data):
        raise TpmResponseError(f"{what}: a {n}-byte field at offset {off} runs past the end")
    return data[off + 2:off + 2 + n], off + 2 + n


# -- commands ------------------------------------------------------------------------------------
def create_primary(hierarchy: int, template: bytes) -> bytes:
    """TPM2_CreatePrimary(hierarchy, template): empty userAuth and sensitive data, no outsideInfo,
    no creation PCRs. A primary key is derived from the hierarchy's seed and the template, so the
    same command gives the same key on the same TPM every time."""
    params = (tpm2b(struct.pack(">HH", 0, 0)) + tpm2b(template) + tpm2b(b"") + struct.pack(">I", 0))
    return command(CC_CREATE_PRIMARY, struct.pack(">I", hierarchy), params, auth=_PW_SESSION)


def create_primary_ak() -> bytes:
    """The AK: CreatePrimary(TPM_RH_ENDORSEMENT, AK_TEMPLATE)."""
    return create_primary(RH_ENDORSEMENT, AK_TEMPLATE)


def parse_create_primary(resp: bytes) -> tuple[int, bytes]:
    """(object handle, TPM2B_PUBLIC) from a TPM2_CreatePrimary response."""
    (handle,), params = _params(parse_response(resp, "TPM2_CreatePrimary"), 1, "TPM2_CreatePrimary")
    public, _ = _take2b(params, 0, "TPM2_CreatePrimary outPublic")
    return handle, params[:2 + len(public)]


def quote(handle: int, qualifying: bytes, pcrs: Iterable[int]) -> bytes:
    """TPM2_Quote by `handle` over sha256:`pcrs` with `qualifying` as extraData, the key's own scheme."""
    params = tpm2b(qualifying) + struct.pack(">H", ALG_NULL) + pcr_select(pcrs)
    return command(CC_QUOTE, struct.pack(">I", handle), params, auth=_PW_SESSION)


def parse_quote(resp: bytes) -> tuple[bytes, bytes]:
    """(TPMS_ATTEST, TPMT_SIGNATURE) from a TPM2_Quote response."""
    _, params = _params(parse_response(resp, "TPM2_Quote"), 0, "TPM2_Quote")
    attest, off = _take2b(params, 0, "TPM2_Quote quoted")
    return attest, params[off:]


def read_public(handle: int) -> bytes:
    return command(CC_READ_PUBLIC, struct.pack(">I", handle))


def parse_read_public(resp: bytes) -> bytes:
    """The TPM2B_PUBLIC of a TPM2_ReadPublic response."""
    _, params = _params(parse_response(resp, "TPM2_ReadPublic"), 0, "TPM2_ReadPublic")
    public, _ = _take2b(params, 0, "TPM2_ReadPublic outPublic")
    return params[:2 + len(public)]


def evict_control(transient: int, persistent: int) -> bytes:
    """TPM2_EvictControl(TPM_RH_OWNER, transient -> persistent): keep a key across power cycles."""
    return command(CC_EVICT_CONTROL, struct.pack(">II", RH_OWNER, transient), struct.pack(">I", persistent),
                   auth=_PW_SESSION)


def flush_context(handle: int) -> bytes:
    return command(CC_FLUSH_CONTEXT, params=struct.pack(">I", handle))


def pcr_extend(pcr: int, digests: Mapping[int, bytes]) -> bytes:
    """TPM2_PCR_Extend(pcr) with one digest per bank (TPM_ALG_ID -> digest)."""
    values = struct.pack(">I", len(digests)) + b"".join(struct.pack(">H", a) + d for a, d in digests.items())
    return command(CC_PCR_EXTEND, struct.pack(">I", pcr), values, auth=_PW_SESSION)


def pcr_read(pcrs: Iterable[int]) -> bytes:
    return command(CC_PCR_READ, params=pcr_select(pcrs))


def parse_pcr_read(resp: bytes) -> list[bytes]:
    """The digests of a TPM2_PCR_Read response, in selection order (at most 8 per read)."""
    _, p = _params(parse_response(resp, "TPM2_PCR_Read"), 0, "TPM2_PCR_Read")
    if len(p) < 8:
        raise TpmResponseError("TPM2_PCR_Read: truncated")
    (count,) = struct.unpack_from(">I", p, 4)
    off = 8
    for _ in range(count):  # TPMS_PCR_SELECTION: hash, sizeofSelect, bitmap
        if off + 3 > len(p):
            raise TpmResponseError("TPM2_PCR_Read: truncated selection")
        off += 3 + p[off + 2]
    if off + 4 > len(p):
        raise TpmResponseError("TPM2_PCR_Read: no digest list")
    (n,) = struct.unpack_from(">I", p, off)
    off += 4
    out = []
    for _ in range(n):
        d, off = _take2b(p, off, "TPM2_PCR_Read digest")
        out.append(d)
    return out


def start_policy_session(nonce_caller: bytes) -> bytes:
    """TPM2_StartAuthSession: an unbound, unsalted policy session with SHA-256 and no parameter encryption."""
    if not 16 <= len(nonce_caller) <= 32:
        raise ValueError("nonceCaller must be 16..32 bytes")
    params = tpm2b(nonce_caller) + tpm2b(b"") + struct.pack(">BHH", SE_POLICY, ALG_NULL, ALG_SHA256)
    return command(CC_START_AUTH_SESSION, struct.pack(">II", RH_NULL, RH_NULL), params)


def parse_start_session(resp: bytes) -> int:
    (handle,), _ = _params(parse_response(resp, "TPM2_StartAuthSession"), 1, "TPM2_StartAuthSession")
    return handle


def policy_pcr(session: int, pcrs: Iterable[int]) -> bytes:
    """TPM2_PolicyPCR with an empty pcrDigest: the TPM uses the PCRs' current values."""
    return command(CC_POLICY_PCR, struct.pack(">I", session), tpm2b(b"") + pcr_select(pcrs))


def hmac(key: int, session: int, data: bytes) -> bytes:
    """TPM2_HMAC(key, data) with the key's own hash, authorized by `session`."""
    if len(data) > 1024:
        raise ValueError("TPM2_HMAC data is at most 1024 bytes (TPM2B_MAX_BUFFER)")
    return command(CC_HMAC, struct.pack(">I", key), tpm2b(data) + struct.pack(">H", ALG_NULL), auth=policy_auth(session))


def parse_hmac(resp: bytes) -> bytes:
    _, params = _params(parse_response(resp, "TPM2_HMAC"), 0, "TPM2_HMAC")
    out, _ = _take2b(params, 0, "TPM2_HMAC outHMAC")
    return out


def nv_read_public(index: int) -> bytes:
    return command(CC_NV_READ_PUBLIC, struct.pack(">I", index))


def parse_nv_size(resp: bytes) -> int:
    """dataSize of the TPMS_NV_PUBLIC in a TPM2_NV_ReadPublic response."""
    _, p = _params(parse_response(resp, "TPM2_NV_ReadPublic"), 0, "TPM2_NV_ReadPublic")
    public, _ = _take2b(p, 0, "TPM2_NV_ReadPublic nvPublic")
    if len(public) < 14:  # nvIndex, nameAlg, attributes, authPolicy (2B), dataSize
        raise TpmResponseError("TPM2_NV_ReadPublic: nvPublic too short")
    (n,) = struct.unpack_from(">H", public, 10)
    if 14 + n > len(public):
        raise TpmResponseError(f"TPM2_NV_ReadPublic: an authPolicy of {n} bytes runs past nvPublic")
    return int(struct.unpack_from(">H", public, 12 + n)[0])


def nv_read(index: int, size: int, offset: int) -> bytes:
    """TPM2_NV_Read by the owner (EK certificate indices are owner-readable)."""
    return command(CC_NV_READ, struct.pack(">II", RH_OWNER, index), struct.pack(">HH", size, offset), auth=_PW_SESSION)


def parse_nv_read(resp: bytes) -> bytes:
    _, p = _params(parse_response(resp, "TPM2_NV_Read"), 0, "TPM2_NV_Read")
    data, _ = _take2b(p, 0, "TPM2_NV_Read data")
    return data


def policy_secret(auth_handle: int, session: int) -> bytes:
    """TPM2_PolicySecret(auth_handle, session) with empty nonceTPM, cpHashA, policyRef and no
    expiration, authorized by auth_handle's (empty) password: the EK's policy for the endorsement."""
    params = tpm2b(b"") + tpm2b(b"") + tpm2b(b"") + struct.pack(">i", 0)
    return command(CC_POLICY_SECRET, struct.pack(">II", auth_handle, session), params, auth=_PW_SESSION)


def activate_credential(activate: int, key: int, key_session: int, credential_blob: bytes, secret: bytes) -> bytes:
    """TPM2_ActivateCredential(activate = the AK, key = the EK): the AK authorized by its empty
    password (ADMIN role, its adminWithPolicy is clear), the EK by a policy session that has run
    PolicySecret(endorsement). `credential_blob` (TPM2B_ID_OBJECT) and `secret`
    (TPM2B_ENCRYPTED_SECRET) are given with their size prefixes, as MakeCredential returns them."""
    auth = _PW_SESSION + policy_auth(key_session)
    return command(CC_ACTIVATE_CREDENTIAL, struct.pack(">II", activate, key), credential_blob + secret, auth=auth)


def parse_activate_credential(resp: bytes) -> bytes:
    """certInfo: the secret the TPM recovered."""
    _, params = _params(parse_response(resp, "TPM2_ActivateCredential"), 0, "TPM2_ActivateCredential")
    out, _ = _take2b(params, 0, "TPM2_ActivateCredential certInfo")
    return out


def dictionary_attack_lock_reset() -> bytes:
    """TPM2_DictionaryAttackLockReset(TPM_RH_LOCKOUT) with the (empty) lockout password."""
    return command(CC_DA_LOCK_RESET, struct.pack(">I", RH_LOCKOUT), auth=_PW_SESSION)


def dictionary_attack_parameters(max_tries: int, recovery_time: int, lockout_recovery: int) -> bytes:
    """TPM2_DictionaryAttackParameters(TPM_RH_LOCKOUT): failures before lockout, seconds to forget one."""
    return command(CC_DA_PARAMETERS, struct.pack(">I", RH_LOCKOUT),
                   struct.pack(">III", max_tries, recovery_time, lockout_recovery), auth=_PW_SESSION)


def shutdown(kind: int = SU_CLEAR) -> bytes:
    """TPM2_Shutdown: an orderly shutdown, so the next TPM2_Startup counts no dictionary-attack failure."""
    return command(CC_SHUTDOWN, params=struct.pack(">H", kind))


def ok(resp: bytes, what: str) -> None:
    parse_response(resp, what)


# -- the PCR-bound CDI key -----------------------------------------------------------------------
def policy_pcr_digest(pcrs: Mapping[int, bytes]) -> bytes:
    """The policyDigest of a session after TPM2_PolicyPCR over these SHA-256 PCR values (Part 3
    23.7): SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || SHA-256(values in PCR order))."""
    order = sorted(pcrs)
    values = hashlib.sha256(b"".join(pcrs[i] for i in order)).digest()
    return hashlib.sha256(bytes(32) + struct.pack(">I", CC_POLICY_PCR) + pcr_select(order) + values).digest()


def cdi_key_template(policy: bytes) -> bytes:
    """TPMT_PUBLIC of the HMAC key that derives CDI_1: a keyedhash HMAC-SHA256 signing key whose
    secret is generated inside the TPM (sensitiveDataOrigin) and never leaves it (fixedTPM,
    fixedParent), usable only through its policy (userWithAuth clear, adminWithPolicy set)."""
    attrs = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | NO_DA | SIGN
    return (struct.pack(">HHI", ALG_KEYEDHASH, ALG_SHA256, attrs) + tpm2b(policy)
            + struct.pack(">HH", ALG_HMAC, ALG_SHA256) + tpm2b(CDI_UNIQUE))
