"""Stage events for the boot server (docs/boot-server.md, "Fleet"): what the console protocol
says, also posted over HTTP, so a fleet without serial cables can still be watched.

Each stage calls `emit(stage, kind, **detail)` next to its console line (`start`, `handover`,
`ready`, `refused` + reason + CID, `fatal`, and the agent's `result` / `veto` / `error`). An event
is a DAG-CBOR map

    {"v": 1, "stage": "firmware"|"bootstrap"|"agent", "kind": str, "mac": "aa:bb:..",
     "seq": int, "t": unix ms, "boot_mode": "measured"|"unmeasured", "detail": {str: str}}

posted as `POST /api/events` (application/cbor) to the boot server: on a measured boot as
`{"sign1": COSE_Sign1 (attached payload = the event), "chain": the stage's DICE chain,
"tpm"?: on a TPM-measured boot, the AK's quote binding the chain's L1 key}`, signed
with the key the stage owns (the attestation key derived from its own CDI: L0's from CDI_0, the
bootstrap's from CDI_1, the agent's alias key from CDI_2), so the server can check the chain
against its device registry and the signature against the chain's leaf; on an unmeasured boot as
`{"event": bytes}`, which the server records as unsigned.

Where: the boot config's first gateway (the boot server's own unless `--gateway` says
otherwise), or `cidboot.events=URL` on the kernel command line. The stage learns it when it
passes `bootconfig=` (raw bytes or a BootConfig); events emitted earlier wait in a bounded queue.
`CIDBOOT_EVENTS=URL` in the environment overrides both (development runs outside a guest).

Best effort, never in the boot's way: `emit` only queues; a daemon thread posts with a short
timeout and retries while the network comes up; the last events before a kexec or power-off
(`handover`, `refused`, `fatal`) wait at most FLUSH_WAIT seconds for the queue to drain. No
failure here ever reaches the stage (stdlib only: this runs in the guests).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PATH = "/api/events"
CONTENT_TYPE = "application/cbor"
TIMEOUT = 1.5  # seconds per POST
FLUSH_WAIT = 2.0  # seconds a final event (before kexec / power-off) waits for the queue to drain
RETRY_PAUSE = 0.5
MAX_QUEUE = 64  # events kept while the server is unknown or unreachable; the oldest go first
MAX_DETAIL = 2048  # characters per detail value
FINAL = frozenset({"handover", "refused", "fatal"})
STAGES = ("firmware", "bootstrap", "agent")


def _mac() -> str:
    """The MAC of the first non-loopback interface with carrier (the boot NIC), or ""."""
    try:
        for d in sorted(Path("/sys/class/net").iterdir()):
            if d.name == "lo":
                continue
            addr = (d / "address").read_text().strip().lower()
            if addr and addr != "00:00:00:00:00:00":
                return addr
    except OSError:
        pass
    return ""


def _cmdline_url(path: str = "/proc/cmdline") -> str | None:
    try:
        for arg in Path(path).read_text().split():
            if arg.startswith("cidboot.events="):
                return arg.split("=", 1)[1]
    except OSError:
        pass
    return None


def server_from_bootconfig(cfg: Any) -> str | None:
    """The events URL base from a boot config (raw bytes/str or a BootConfig): its first gateway."""
    gateways: Any
    if isinstance(cfg, bytes | bytearray | str):
        try:
            gateways = json.loads(bytes(cfg) if not isinstance(cfg, str) else cfg).get("gateways")
        except (ValueError, AttributeError):
            return None
    else:
        gateways = getattr(cfg, "gateways", None)
    if isinstance(gateways, list | tuple) and gateways and isinstance(gateways[0], str) \
            and gateways[0].startswith(("http://", "https://")):
        return str(gateways[0]).rstrip("/")
    return None


@dataclass
class Identity:
    """What a stage signs its events with: its own attestation key and its DICE chain."""

    key: Any  # cidboot.trust.cose.PrivateKey
    chain: bytes
    tpm: bytes | None = None  # a TPM device's KeyBinding (cidboot.trust.tpm.evidence): its AK vouches for L1's key


def identity_from_dice(dice: bytes | bytearray) -> Identity | None:
    """The stage's signing identity from its encoded DICE handover ({1: CDI_Attest, 2: CDI_Seal,
    3: chain}): the attestation key derived from CDI_Attest (as the DICE profile derives a layer's
    key), and the chain whose last certificate names that key. The decoded CDI copies are wiped."""
    from cidboot.stage.console import wipe
    from cidboot.trust.dice import decode_handover, key_from_cdi

    raw = bytes(dice)
    try:
        h = decode_handover(raw)
    finally:
        wipe(raw)
    try:
        return Identity(key_from_cdi(h.cdi_attest), h.chain)
    finally:
        wipe(h.cdi_attest)
        wipe(h.cdi_seal)


def encode_event(event: dict[str, Any], identity: Identity | None) -> bytes:
    """The POST body for one event: signed (COSE_Sign1 + chain) with an identity, else unsigned."""
    from cidboot.ipld import dagcbor

    payload = dagcbor.encode(event)
    if identity is None:
        return dagcbor.encode({"event": payload})
    from cidboot.trust import cose

    body = {"sign1": cose.sign1(payload, identity.key), "chain": identity.chain}
    if identity.tpm is not None:
        body["tpm"] = identity.tpm
    return dagcbor.encode(body)


@dataclass
class Reporter:
    """One stage's event sender: a bounded queue and a daemon thread posting it in order."""

    stage: str = ""
    server: str | None = None
    identity: Identity | None = None
    mac: str = ""
    boot_mode: str = "unmeasured"
    timeout: float = TIMEOUT
    sent: int = 0
    failed: int = 0
    _queue: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_QUEUE))
    _seq: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def configure(self, *, server: str | None = None, identity: Identity | None = None, mac: str | None = None) -> None:
        with self._cond:
            if server:
                self.server = server.rstrip("/")
            if identity is not None:
                self.identity = identity
                self.boot_mode = "measured"
            if mac:
                self.mac = mac.lower()
            self._cond.notify_all()

    def emit(self, stage: str, kind: str, detail: dict[str, Any]) -> None:
        with self._cond:
            self.stage = stage
            self._seq += 1
            self._queue.append({"v": 1, "stage": stage, "kind": kind, "seq": self._seq,
                                "t": int(time.time() * 1000),
                                "detail": {str(k): str(v)[:MAX_DETAIL] for k, v in detail.items() if v is not None}})
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="cidboot-events")
                self._thread.start()

    def flush(self, wait: float = FLUSH_WAIT) -> bool:
        """Wait up to `wait` seconds for the queue to drain (before a kexec or power-off)."""
        deadline = time.monotonic() + wait
        with self._cond:
            while self._queue and self.server:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return not self._queue

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue and self.server):
                    self._cond.wait()
                ev = dict(self._queue[0])
                server, identity = self.server, self.identity
                mac = self.mac or _mac()
                ev["mac"], ev["boot_mode"], ev["arch"] = mac, self.boot_mode, os.uname().machine
            try:
                ok = post(server, encode_event(ev, identity), self.timeout)
            except Exception:  # never let reporting disturb the boot
                ok = False
            with self._cond:
                if ok and self._queue and self._queue[0]["seq"] == ev["seq"]:
                    self._queue.popleft()
                    self.sent += 1
                elif not ok:
                    self.failed += 1
                self._cond.notify_all()
                if not ok:  # a pause before the retry (not time.sleep: the stage's own, which tests patch)
                    self._cond.wait(RETRY_PAUSE)


def post(server: str, body: bytes, timeout: float = TIMEOUT) -> bool:
    """POST one event body; True once the server answered (any 2xx/4xx: a 4xx is its verdict
    on the event, retrying would not change it), False to retry (no answer, 5xx)."""
    u = urlsplit(server)
    if u.scheme not in ("http", "https") or not u.hostname:
        return True  # not a URL we can ever reach: drop the event instead of retrying forever
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path.rstrip("/") + PATH, body=body, headers={"Content-Type": CONTENT_TYPE})
        resp = conn.getresponse()
        resp.read()
        return resp.status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


_reporter = Reporter()


def reporter() -> Reporter:
    return _reporter


def emit(stage: str, kind: str, *, dice: bytes | bytearray | None = None, identity: Identity | None = None,
         bootconfig: Any = None, **detail: Any) -> None:
    """Queue a stage event (the one-line hook beside each console line); never raises, never
    blocks beyond FLUSH_WAIT for the final events of a stage.

    `dice` (the stage's encoded DICE handover) or `identity` makes this and later events signed;
    `bootconfig` tells where the boot server is. Other keywords are the event's detail."""
    try:
        r = _reporter
        ident = identity
        if ident is None and dice:
            try:
                ident = identity_from_dice(dice)
            except Exception:
                ident = None
        server = os.environ.get("CIDBOOT_EVENTS") or _cmdline_url() \
            or (server_from_bootconfig(bootconfig) if bootconfig is not None else None)
        r.configure(server=server, identity=ident)
        r.emit(stage, kind, detail)
        if kind == "fatal" or (kind in FINAL and stage != "agent"):  # the agent goes on serving after a refusal
            r.flush()
    except Exception:  # noqa: S110 -- best effort: a report that cannot be made is not a boot failure
        pass


__all__ = ["Identity", "Reporter", "emit", "encode_event", "identity_from_dice", "post", "reporter",
           "server_from_bootconfig", "PATH", "STAGES"]
