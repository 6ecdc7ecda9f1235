"""A strict parser of the TCG PC Client crypto-agile event log (TCG PC Client Platform Firmware
Profile, section 10), and its replay to PCR values.

The log UEFI firmware keeps (and Linux exposes as /sys/kernel/security/tpm0/binary_bios_measurements)
starts with one TCG_PCClientPCREvent in the old SHA-1 format whose event is the
TCG_EfiSpecIdEvent ("Spec ID Event03"): it lists the PCR banks and their digest sizes. Every
following record is a TCG_PCR_EVENT2: pcrIndex, eventType, a TPML_DIGEST_VALUES with one digest
per bank (in the header's sizes), and the event data. All integers are little-endian.

Strict on purpose, because the log is attacker-supplied evidence: the header must be the spec-id
event with a SHA-256 bank, each record must carry exactly one digest per declared bank, sizes are
bounded, and a byte left over is an error. Replay extends the SHA-256 bank: PCR := SHA-256(PCR ||
digest) for every event except EV_NO_ACTION (never extended); a StartupLocality EV_NO_ACTION event
sets PCR 0's initial value to the locality the TPM was started from (PFP 10.4.5.3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cidboot.trust.tpm._wire import Reader
from cidboot.trust.tpm.errors import EventLogFormatError

# TPM_ALG_ID -> digest size for the algorithms whose size we know (the header must agree)
ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_SM3_256 = 0x0004, 0x000B, 0x000C, 0x000D, 0x0012
DIGEST_SIZES = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64, ALG_SM3_256: 32}

EV_POST_CODE = 0x00000001
EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_ACTION = 0x00000005
EV_EVENT_TAG = 0x00000006
EV_S_CRTM_VERSION = 0x00000008
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

NUM_PCRS = 24  # PC Client: PCR 0..23
MAX_LOG_BYTES = 4 << 20  # a firmware log is tens of KiB; Linux caps its own copy far lower
MAX_EVENT_BYTES = 1 << 20  # the largest real events (dbx contents) are tens of KiB
MAX_ALGORITHMS = 8
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"


@dataclass(frozen=True)
class SpecId:
    """The TCG_EfiSpecIdEvent header: which banks the log carries and in which digest sizes."""

    platform_class: int
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    algorithms: tuple[tuple[int, int], ...]  # (TPM_ALG_ID, digest size) in log order
    vendor_info: bytes


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2 record (`index`: its position after the header, `offset`: in the log)."""

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Mapping[int, bytes]
    data: bytes

    @property
    def sha256(self) -> bytes:
        return self.digests[ALG_SHA256]


@dataclass(frozen=True)
class EventLog:
    spec_id: SpecId
    events: tuple[Event, ...]
    startup_locality: int | None = None

    def replay(self) -> dict[int, bytes]:
        """The SHA-256 PCR values the events extend to, PCR 0..23 (unextended PCRs keep their reset value)."""
        return replay(self)


def _initial_pcrs(startup_locality: int | None) -> dict[int, bytes]:
    # PCR 17..22 reset to all ones at power-on (they are zeroed only by a dynamic launch)
    pcrs = {i: (b"\xff" * 32 if 17 <= i <= 22 else bytes(32)) for i in range(NUM_PCRS)}
    if startup_locality is not None:
        pcrs[0] = bytes(31) + bytes([startup_locality])
    return pcrs


def replay(log: EventLog) -> dict[int, bytes]:
    pcrs = _initial_pcrs(log.startup_locality)
    for ev in log.events:
        if ev.event_type != EV_NO_ACTION:
            pcrs[ev.pcr] = hashlib.sha256(pcrs[ev.pcr] + ev.sha256).digest()
    return pcrs


def _spec_id(r: Reader) -> SpecId:
    pcr = r.u32("header pcrIndex")
    etype = r.u32("header eventType")
    digest = r.take(20, "header SHA-1 digest")
    size = r.u32("header eventSize")
    if pcr != 0 or etype != EV_NO_ACTION or digest != bytes(20):
        raise r.fail(f"the first event must be the spec-id EV_NO_ACTION in PCR 0 with a zero digest, "
                     f"got PCR {pcr} type {etype:#x}")
    if size > 4096:
        raise r.fail(f"spec-id event of {size} bytes is implausibly large")
    body = Reader(r.take(size, "spec-id event"), EventLogFormatError, "event log spec-id event", little=True)
    if body.take(16, "signature") != SPEC_ID_SIGNATURE:
        raise body.fail("not a crypto-agile log (signature is not 'Spec ID Event03'): SHA-1-only logs are refused")
    platform_class = body.u32("platformClass")
    minor, major, errata = body.u8("specVersionMinor"), body.u8("specVersionMajor"), body.u8("specErrata")
    uintn = body.u8("uintnSize")
    if major != 2 or uintn not in (1, 2):
        raise body.fail(f"spec version {major}.{minor} / uintnSize {uintn}: expected 2.x and 1 or 2")
    n = body.u32("numberOfAlgorithms")
    if not 1 <= n <= MAX_ALGORITHMS:
        raise body.fail(f"numberOfAlgorithms {n} is not 1..{MAX_ALGORITHMS}")
    algs: list[tuple[int, int]] = []
    for i in range(n):
        alg, dsize = body.u16(f"algorithm {i} id"), body.u16(f"algorithm {i} digest size")
        if alg in {a for a, _ in algs}:
            raise body.fail(f"algorithm {alg:#06x} listed twice")
        if DIGEST_SIZES.get(alg, dsize) != dsize or not 1 <= dsize <= 64:
            raise body.fail(f"algorithm {alg:#06x} declared with digest size {dsize}")
        algs.append((alg, dsize))
    if ALG_SHA256 not in dict(algs):
        raise body.fail("the log has no SHA-256 bank")
    vendor = body.take(body.u8("vendorInfoSize"), "vendorInfo")
    body.end()
    return SpecId(platform_class, (major, minor, errata), uintn, tuple(algs), vendor)


def parse(data: bytes) -> EventLog:
    """Parse a whole crypto-agile event log; every malformation raises EventLogFormatError."""
    if len(data) > MAX_LOG_BYTES:
        raise EventLogFormatError(f"event log: {len(data)} bytes exceeds the maximum of {MAX_LOG_BYTES}")
    r = Reader(data, EventLogFormatError, "event log", little=True)
    spec = _spec_id(r)
    sizes = dict(spec.algorithms)
    events: list[Event] = []
    locality: int | None = None
    pcr0_extended = False
    while r.left:
        offset, i = r.pos, len(events)
        pcr = r.u32(f"event {i} pcrIndex")
        etype = r.u32(f"event {i} eventType")
        if pcr >= NUM_PCRS:
            raise r.fail(f"event {i}: PCR {pcr} is not 0..{NUM_PCRS - 1}")
        count = r.u32(f"event {i} digest count")
        if count != len(sizes):
            raise r.fail(f"event {i}: {count} digests, the header declares {len(sizes)} banks")
        digests: dict[int, bytes] = {}
        for j in range(count):
            alg = r.u16(f"event {i} digest {j} algorithm")
            if alg not in sizes or alg in digests:
                raise r.fail(f"event {i}: digest {j} has algorithm {alg:#06x}, "
                             f"{'repeated' if alg in digests else 'not declared in the header'}")
            digests[alg] = r.take(sizes[alg], f"event {i} digest {j}")
        size = r.u32(f"event {i} eventSize")
        if size > MAX_EVENT_BYTES:
            raise r.fail(f"event {i}: eventSize {size} exceeds the maximum of {MAX_EVENT_BYTES}")
        edata = r.take(size, f"event {i} data")
        if etype == EV_NO_ACTION and edata.startswith(STARTUP_LOCALITY_SIGNATURE):
            if pcr != 0 or len(edata) != 17 or locality is not None or pcr0_extended:
                raise EventLogFormatError(f"event log: event {i} (offset {offset}): a StartupLocality event "
                                          "must be a single 17-byte PCR 0 event before any PCR 0 measurement")
            locality = edata[16]
        elif etype != EV_NO_ACTION and pcr == 0:
            pcr0_extended = True
        events.append(Event(i, offset, pcr, etype, digests, edata))
    return EventLog(spec, tuple(events), locality)


def build(events: list[tuple[int, int, bytes, bytes]], *, algorithms: tuple[tuple[int, int], ...] = ((ALG_SHA256, 32),),
          vendor_info: bytes = b"") -> bytes:
    """Encode a crypto-agile log from (pcr, event type, SHA-256 digest, data) tuples (other banks
    get the hash of the data in their algorithm: tests and the harness's synthetic logs)."""
    import struct
    spec = (SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
            + b"".join(struct.pack("<HH", a, s) for a, s in algorithms) + bytes([len(vendor_info)]) + vendor_info)
    out = [struct.pack("<II", 0, EV_NO_ACTION), bytes(20), struct.pack("<I", len(spec)), spec]
    names = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
    for pcr, etype, digest, data in events:
        out.append(struct.pack("<III", pcr, etype, len(algorithms)))
        for alg, size in algorithms:
            d = digest if alg == ALG_SHA256 else hashlib.new(names.get(alg, "sha512"), data).digest()[:size]
            out.append(struct.pack("<H", alg) + d)
        out.append(struct.pack("<I", len(data)) + data)
    return b"".join(out)
