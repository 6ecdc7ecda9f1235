"""Stage events for the boot server (docs/boot-server.md, "Fleet"): what the console protocol
says, also posted over HTTP, so a fleet without serial cables can still be watched.

Each stage calls `emit(stage, kind, **detail)` next to its console line (`start`, `handover`,
`ready`, `refused` + reason + CID, `fatal`, and the agent's `result` / `veto` / `error`). An event
is a DAG-CBOR map

    {"v": 1, "stage": "firmware"|"bootstrap"|"agent", "kind": str, "mac": "aa:bb:..",
     "seq": int, "t": unix ms, "boot_mode": "measured"|"unmeasured", "boot": session,
     "detail": {str: str}}

posted as `POST /api/events` (application/cbor) to the boot server: on a measured boot as
`{"sign1": COSE_Sign1 (attached payload = the event), "chain": the stage's DICE chain,
"tpm"?: on a TPM-measured boot, the AK's quote binding the chain's L1 key}`, signed
with the key the stage owns (the attestation key derived from its own CDI: L0's from CDI_0, the
bootstrap's from CDI_1, the agent's alias key from CDI_2), so the server can check the chain
against its device registry and the signature against the chain's leaf; on an unmeasured boot as
`{"event": bytes}`, which the server records as unsigned.

Not replayable: before its first event a stage asks the server for a session (`POST
/api/events/session`, a fresh random nonce); every event it signs carries it as `boot`, and
`seq` counts up. The server binds the session to the first key that signs with it and accepts
each (session, seq) once, in increasing order: a captured event posted again is an old seq or an
unknown (forgotten) session, rejected and recorded, and moves nothing. A stage whose session the
server no longer knows (409) asks for a new one and posts the event again, once.

Where: the boot config's `events` URL (`bootstrap serve` puts its own /api/events there), or
`cidboot.events=URL` on the kernel command line. The stage learns it when it passes
`bootconfig=` (raw bytes or a BootConfig) or calls `learn_bootconfig` (a UEFI-started bootstrap,
which fetches its boot config after its start event); events emitted earlier wait in a bounded queue. A
boot config without `events` means: do not post; the stage says so once on the console
(`cidboot: events: ...`) and drops its events. `CIDBOOT_EVENTS=URL` in the environment
overrides both (development runs outside a guest). A URL that does not end in /api/events is
a server's base URL and gets it appended.

Best effort, never in the boot's way: `emit` only queues; a daemon thread posts with a short
timeout and retries while the network comes up; the last events before a kexec or power-off
(`handover`, `refused`, `fatal`) wait at most FLUSH_WAIT seconds for the queue to drain. No
failure here ever reaches the stage (stdlib only: this runs in the guests).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; importing `typing` cost the firmware ~9 ms of instructions (TCG)
if TYPE_CHECKING:
    from typing import Any

PATH = "/api/events"
SESSION_PATH = PATH + "/session"
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


def endpoint(url: str) -> str:
    """The events endpoint a URL names: itself when it ends in /api/events, else a server's base
    URL with /api/events appended (`CIDBOOT_EVENTS`, `cidboot.events=` may give either)."""
    u = url.rstrip("/")
    return u if u.endswith(PATH) else u + PATH


def server_from_bootconfig(cfg: Any) -> str | None:
    """The events URL of a boot config (raw bytes/str or a BootConfig): its `events` field, or
    None when it has none (then nothing is posted: the gateways are where blocks come from, not
    necessarily the boot server)."""
    url: Any
    if isinstance(cfg, bytes | bytearray | str):
        try:
            url = json.loads(bytes(cfg) if not isinstance(cfg, str) else cfg).get("events")
        except (ValueError, AttributeError):
            return None
    else:
        url = getattr(cfg, "events", None)
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return endpoint(url)
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


@dataclass(eq=False)  # compared by identity (it holds a lock and a thread): no generated __eq__ to compile at start
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
    off: str | None = None  # why this stage posts nothing (said once on the console)
    session: str | None = None  # the server's nonce for this stage's events (module docstring)
    _renewed: int = 0  # the seq of the event a new session was fetched for (once per event)
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

    def disable(self, reason: str) -> None:
        """Post nothing from now on; say why once on the console (stdout is the console)."""
        with self._cond:
            if self.off is None:
                self.off = reason
                self._queue.clear()
                print(f"cidboot: events: not posted: {reason}", flush=True)

    def emit(self, stage: str, kind: str, detail: dict[str, Any]) -> None:
        with self._cond:
            if self.off is not None:
                return
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
                session = self.session
            status: int | None = None
            try:
                if session is None:
                    session = new_session(server, self.timeout)
                if session is not None:
                    ev["boot"] = session
                    status = post_status(server, encode_event(ev, identity), self.timeout)
            except Exception:  # never let reporting disturb the boot
                status = None
            ok = status is not None and status < 500
            with self._cond:
                self.session = session
                if status == 409 and self._renewed != ev["seq"]:  # the server forgot our session: once more
                    self.session, self._renewed = None, ev["seq"]
                    continue
                if ok and self._queue and self._queue[0]["seq"] == ev["seq"]:
                    self._queue.popleft()
                    self.sent += 1
                elif not ok:
                    self.failed += 1
                self._cond.notify_all()
                if not ok:  # a pause before the retry (not time.sleep: the stage's own, which tests patch)
                    self._cond.wait(RETRY_PAUSE)


def _request(url: str, body: bytes, timeout: float) -> tuple[int, bytes] | None:
    """POST `body` to `url`: (status, answer), or None without an answer. Plain http:// goes
    through a socket here (`_post_http`): http.client pulls in email and ssl, ~0.3 s of the
    firmware's start-up under TCG for two small POSTs; https:// uses http.client."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return 400, b""  # not a URL we can ever reach: drop the event instead of retrying forever
    if u.scheme == "http":
        return _post_http(u.hostname, u.port or 80, u.path or "/", body, timeout)
    import http.client

    conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path, body=body, headers={"Content-Type": CONTENT_TYPE})
        resp = conn.getresponse()
        return resp.status, resp.read(MAX_ANSWER)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


MAX_ANSWER = 4096  # bytes of an answer kept (a session nonce, an error message)


def _post_http(host: str, port: int, path: str, body: bytes, timeout: float) -> tuple[int, bytes] | None:
    """One HTTP/1.1 POST with `Connection: close`: (status, up to MAX_ANSWER bytes of the body),
    or None when there is no well-formed answer (then the event is retried)."""
    import socket

    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(head + body)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(8192)
                if not chunk:
                    break
                data += chunk
            header, sep, rest = data.partition(b"\r\n\r\n")
            lines = header.split(b"\r\n")
            parts = lines[0].split(None, 2)
            if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                return None
            fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
            length = fields.get(b"content-length")
            want = min(int(length), MAX_ANSWER) if length is not None and length.isdigit() else MAX_ANSWER
            while len(rest) < want:  # chunked answers are not expected from the boot server: read to close
                chunk = sock.recv(8192)
                if not chunk:
                    break
                rest += chunk
    except (OSError, ValueError, UnicodeError):
        return None
    return int(parts[1]), rest[:want]


def post_status(server: str, body: bytes, timeout: float = TIMEOUT) -> int | None:
    """POST one event body to `server` (an events URL or a server's base URL): the HTTP status,
    or None without an answer."""
    got = _request(endpoint(server), body, timeout)
    return got[0] if got else None


def post(server: str, body: bytes, timeout: float = TIMEOUT) -> bool:
    """POST one event body; True once the server answered (any 2xx/4xx: a 4xx is its verdict
    on the event, retrying would not change it), False to retry (no answer, 5xx)."""
    status = post_status(server, body, timeout)
    return status is not None and status < 500


def new_session(server: str, timeout: float = TIMEOUT) -> str | None:
    """A fresh session nonce from the boot server (`POST /api/events/session`), or None."""
    got = _request(endpoint(server) + SESSION_PATH[len(PATH):], b"", timeout)
    if got is None or got[0] != 201:
        return None
    try:
        s = json.loads(got[1]).get("session")
    except (ValueError, AttributeError):
        return None
    return s if isinstance(s, str) and 0 < len(s) <= 64 else None


_reporter = Reporter()


def _server(r: Reporter, bootconfig: Any) -> str | None:
    """Where to post: CIDBOOT_EVENTS, `cidboot.events=`, else the boot config's `events` URL (a
    boot config without one switches posting off)."""
    server = os.environ.get("CIDBOOT_EVENTS") or _cmdline_url()
    if server is None and bootconfig is not None:
        server = server_from_bootconfig(bootconfig)
        if server is None and r.server is None:
            r.disable("the boot config names no events URL")
    return server


def learn_bootconfig(bootconfig: Any) -> None:
    """The stage has its boot config now: post what is queued (and what follows) to its events
    URL. A bootstrap started by UEFI has no hand-off, so its `start` event is queued before it
    has a boot config to learn the boot server from (it fetches it only once the network is up);
    without this call nothing would ever tell the reporter where to post. Never raises."""
    try:
        _reporter.configure(server=_server(_reporter, bootconfig))
    except Exception:  # noqa: S110 -- best effort, as emit
        pass


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
        r.configure(server=_server(r, bootconfig), identity=ident)
        r.emit(stage, kind, detail)
        if kind == "fatal" or (kind in FINAL and stage != "agent"):  # the agent goes on serving after a refusal
            r.flush()
    except Exception:  # noqa: S110 -- best effort: a report that cannot be made is not a boot failure
        pass


__all__ = ["Identity", "Reporter", "emit", "encode_event", "endpoint", "identity_from_dice", "learn_bootconfig",
           "new_session", "post",
           "post_status", "reporter", "server_from_bootconfig", "PATH", "SESSION_PATH", "STAGES"]
