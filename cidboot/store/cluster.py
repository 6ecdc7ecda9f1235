"""IPFS Cluster REST API client: pin a CID with a replication factor, watch where it is pinned.

IPFS Cluster (github.com/ipfs-cluster/ipfs-cluster) orchestrates one pinset over many Kubo
nodes: a pin names a CID and a replication factor MIN:MAX, the cluster allocates it to MAX
peers (at least MIN), each allocated peer's Kubo fetches and pins the DAG, and when a peer
stops answering the cluster re-allocates its pins so MIN copies survive. This module speaks
its REST API (default port 9094) with the standard library only: JSON shapes are those of
api/types.go in v1.1.6 (`Pin`, `GlobalPinInfo`, `PinInfoShort`, `ID`), routes those of
api/rest/restapi.go.

The cluster is a service we ask, not a source of trust: a pin answer that names another CID,
a status without a peer map, or a non-JSON body is refused with `ClusterProtocolError`.
What the cluster stores is verified by whoever fetches it (by CID, as always).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cidboot.errors import CidbootError, FormatError, NotFoundError
from cidboot.ipld.cid import CID

DEFAULT_TIMEOUT = 30.0
MAX_BODY = 64 * 2**20  # a status of the whole pinset is large; one pin's is a few KiB

# TrackerStatus strings (api/types.go trackerStatusString) a peer reports for one CID.
PINNED = "pinned"
IN_PROGRESS = frozenset({"pinning", "pin_queued", "queued"})
FAILED = frozenset({"pin_error", "cluster_error", "error", "unexpectedly_unpinned"})


class ClusterError(CidbootError):
    """The cluster refused a request, or did not do what was asked in time."""


class ClusterUnreachable(ClusterError):
    """Nothing answered at the cluster URL (refused, timed out, DNS, TLS)."""


class ClusterProtocolError(FormatError):
    """The cluster URL answered, but not with what the IPFS Cluster REST API returns."""


class ClusterRequestRefused(ClusterError):
    """The cluster answered with an HTTP error (its own message is quoted)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PinNotFound(NotFoundError):
    """The cluster has no pin for this CID."""


class ReplicationTimeout(ClusterError):
    """A pin did not reach the wanted number of peers before the deadline."""

    def __init__(self, message: str, status: PinStatus) -> None:
        super().__init__(message)
        self.status = status


class BadReplication(FormatError):
    """A replication factor that is not MIN:MAX with 1 <= MIN <= MAX (or -1 for everywhere)."""


class BadClusterURL(FormatError):
    """A cluster URL that is not http(s)://HOST:PORT[/prefix]."""


@dataclass(frozen=True)
class Replication:
    """MIN:MAX copies; -1:-1 means "on every peer" (the cluster's own convention)."""

    min: int
    max: int

    @classmethod
    def parse(cls, text: str) -> Replication:
        """'2:3', '2' (= 2:2) or '-1' (everywhere)."""
        lo, sep, hi = text.strip().partition(":")
        try:
            rmin, rmax = int(lo), int(hi if sep else lo)
        except ValueError:
            raise BadReplication(f"replication must be MIN:MAX (e.g. 2:3), N, or -1; got {text!r}") from None
        return cls(rmin, rmax)

    def __post_init__(self) -> None:
        if (self.min, self.max) == (-1, -1):
            return
        if self.min < 1 or self.max < self.min:
            raise BadReplication(
                f"replication {self.min}:{self.max}: need 1 <= MIN <= MAX, or -1 for every peer"
            )

    @property
    def everywhere(self) -> bool:
        return self.min == -1

    def __str__(self) -> str:
        return "everywhere" if self.everywhere else f"{self.min}:{self.max}"


@dataclass(frozen=True)
class Peer:
    """One cluster peer as `GET /peers` describes it (api.ID)."""

    id: str
    peername: str
    addresses: tuple[str, ...]
    ipfs_id: str
    ipfs_addresses: tuple[str, ...]
    version: str
    error: str  # set when this peer could not be asked for its ID (it is likely down)


@dataclass(frozen=True)
class Pin:
    """The pin the cluster recorded (api.Pin): where it allocated it."""

    cid: CID
    name: str
    allocations: tuple[str, ...]
    replication_min: int
    replication_max: int


@dataclass(frozen=True)
class PeerPinStatus:
    """One peer's view of one pin (api.PinInfoShort)."""

    peer: str
    peername: str
    status: str
    ipfs_id: str
    ipfs_addresses: tuple[str, ...]
    error: str
    attempts: int


@dataclass(frozen=True)
class PinStatus:
    """A pin's status on every peer (api.GlobalPinInfo)."""

    cid: CID
    name: str
    allocations: tuple[str, ...]
    peers: dict[str, PeerPinStatus] = field(default_factory=dict)

    @property
    def pinned(self) -> list[PeerPinStatus]:
        return [p for p in self.peers.values() if p.status == PINNED]

    def summary(self) -> str:
        """'2 pinned, 1 pinning' : what a progress line shows."""
        counts: dict[str, int] = {}
        for p in self.peers.values():
            counts[p.status] = counts.get(p.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no peer reports this pin"

    def describe(self) -> str:
        """Per peer, status and error: what an error message quotes."""
        return "; ".join(
            f"{p.peername or p.peer}: {p.status}" + (f" ({p.error})" if p.error else "")
            for p in sorted(self.peers.values(), key=lambda p: p.peer)
        ) or "no peer reports this pin"


class _Concat:
    """head + file + tail as one readable body (http.client streams it: a CAR is not read into memory)."""

    def __init__(self, head: bytes, f: BinaryIO, tail: bytes) -> None:
        self._parts: list[Any] = [head, f, tail]

    def read(self, n: int = -1) -> bytes:
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._parts.pop(0)
                if part:
                    return part
                continue
            data = part.read(1 << 20)  # http.client asks for 8 KiB: larger reads cost less
            if data:
                return bytes(data)
            self._parts.pop(0)
        return b""


def _str(d: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    v = d.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise ClusterProtocolError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _strs(d: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ClusterProtocolError(f"{where}: {key!r} must be a list of strings")
    return tuple(v)


def _int(d: dict[str, Any], key: str, where: str) -> int:
    v = d.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ClusterProtocolError(f"{where}: {key!r} must be an integer")
    return v


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ClusterProtocolError(f"{where}: expected a JSON object, got {type(v).__name__}")
    return v


def _cid(d: dict[str, Any], where: str, expect: CID | None = None) -> CID:
    text = _str(d, "cid", where, required=True)
    try:
        got = CID.parse(text)
    except FormatError as e:
        raise ClusterProtocolError(f"{where}: bad cid {text!r}: {e}") from None
    if expect is not None and got.multihash != expect.multihash:
        raise ClusterProtocolError(f"{where}: asked about {expect}, the cluster answered about {got}")
    return got


def parse_peer(v: Any) -> Peer:
    d = _obj(v, "peer")
    where = f"peer {d.get('id', '?')}"
    ipfs = d.get("ipfs") or {}
    ipfs = _obj(ipfs, f"{where} ipfs")
    return Peer(
        id=_str(d, "id", where, required=True), peername=_str(d, "peername", where),
        addresses=_strs(d, "addresses", where), ipfs_id=_str(ipfs, "id", where),
        ipfs_addresses=_strs(ipfs, "addresses", where), version=_str(d, "version", where),
        error=_str(d, "error", where),
    )


def parse_pin(v: Any, expect: CID | None = None) -> Pin:
    d = _obj(v, "pin")
    where = f"pin {d.get('cid', '?')}"
    return Pin(
        cid=_cid(d, where, expect), name=_str(d, "name", where), allocations=_strs(d, "allocations", where),
        replication_min=_int(d, "replication_factor_min", where),
        replication_max=_int(d, "replication_factor_max", where),
    )


def parse_status(v: Any, expect: CID | None = None) -> PinStatus:
    d = _obj(v, "pin status")
    where = f"status of {d.get('cid', '?')}"
    cid = _cid(d, where, expect)
    if "peer_map" not in d:
        raise ClusterProtocolError(f"{where}: no peer_map (is this an IPFS Cluster REST API?)")
    peers: dict[str, PeerPinStatus] = {}
    for pid, info in _obj(d["peer_map"] or {}, f"{where} peer_map").items():
        i = _obj(info, f"{where} peer {pid}")
        peers[pid] = PeerPinStatus(
            peer=pid, peername=_str(i, "peername", where), status=_str(i, "status", where, required=True),
            ipfs_id=_str(i, "ipfs_peer_id", where), ipfs_addresses=_strs(i, "ipfs_peer_addresses", where),
            error=_str(i, "error", where), attempts=_int(i, "attempt_count", where),
        )
    return PinStatus(cid, _str(d, "name", where), _strs(d, "allocations", where), peers)


class ClusterClient:
    """One cluster peer's REST API (any peer: the pinset is shared)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BadClusterURL(f"cluster URL must be http(s)://HOST:PORT (REST API, default port 9094), got {url!r}")
        try:
            port = u.port
        except ValueError:
            raise BadClusterURL(f"cluster URL {url!r}: bad port") from None
        self._auth: str | None = None
        if u.username is not None:  # http://user:pass@host:9094: the REST API's basic_auth_credentials
            raw = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
            self._auth = "Basic " + base64.b64encode(raw.encode()).decode()
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        self.url = f"{u.scheme}://{host}{f':{port}' if port else ''}{u.path.rstrip('/')}"
        self.timeout = timeout

    def _request(
        self, method: str, path: str, query: dict[str, str] | None = None, *, body: Any = None,
        headers: dict[str, str] | None = None, timeout: float | None = None,
    ) -> tuple[int, bytes]:
        target = self.url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        req = urllib.request.Request(target, data=body, method=method, headers={"User-Agent": "cidboot", **(headers or {})})
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.status, r.read(MAX_BODY + 1)
        except urllib.error.HTTPError as e:
            body = e.read(4096)
            raise self._http_error(method, path, e.code, body) from None
        except http.client.HTTPException as e:  # something answered, but not HTTP
            raise ClusterProtocolError(
                f"cluster at {self.url}: {method} {path}: not an HTTP answer ({type(e).__name__}: {e}); is this "
                f"the cluster REST API (default port 9094)?"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", None) or e
            raise ClusterUnreachable(f"cluster at {self.url}: {method} {path}: {why}") from None

    def _http_error(self, method: str, path: str, status: int, body: bytes) -> ClusterError:
        msg = body.decode(errors="replace").strip()
        try:  # api.Error: {"code": N, "message": "..."}
            obj = json.loads(body)
            if isinstance(obj, dict) and isinstance(obj.get("message"), str):
                msg = obj["message"]
        except ValueError:
            msg = msg[:200]
        text = f"cluster at {self.url}: {method} {path}: HTTP {status}: {msg or '(no body)'}"
        if status == 404 and path.startswith(("/pins/", "/allocations/")):
            return PinNotFound(text)  # type: ignore[return-value]
        return ClusterRequestRefused(text, status)

    def _json(self, method: str, path: str, query: dict[str, str] | None = None, **kw: Any) -> Any:
        status, body = self._request(method, path, query, **kw)
        if len(body) > MAX_BODY:
            raise ClusterProtocolError(f"cluster at {self.url}: {path}: answer larger than {MAX_BODY} bytes")
        if status == 204 or not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise ClusterProtocolError(
                f"cluster at {self.url}: {method} {path} did not answer JSON (is this the cluster REST API, "
                f"default port 9094?): {body[:80]!r}"
            ) from None

    def _ndjson(self, path: str) -> list[Any]:
        """Streamed endpoints (`/peers`, `/pins`): one JSON object per line."""
        status, body = self._request("GET", path)
        if status == 204:
            return []
        out = []
        for n, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                raise ClusterProtocolError(
                    f"cluster at {self.url}: GET {path}: line {n} is not JSON (is this the cluster REST API, "
                    f"default port 9094?): {line[:80]!r}"
                ) from None
        return out

    def id(self) -> Peer:
        """The peer this client talks to."""
        return parse_peer(self._json("GET", "/id"))

    def version(self) -> str:
        v = _obj(self._json("GET", "/version"), "version")
        return _str(v, "version", "version", required=True)

    def peers(self) -> list[Peer]:
        """Every cluster peer as seen from this one; a peer that is down has `error` set."""
        return [parse_peer(p) for p in self._ndjson("/peers")]

    def pin(self, cid: CID, replication: Replication, *, name: str = "", prefer: list[str] | None = None) -> Pin:
        """Ask the cluster to keep `cid` (recursively) on MIN..MAX peers; returns the allocation.

        `prefer`: cluster peer IDs to allocate first (the cluster's `user-allocations`), e.g. the
        peer whose Kubo node already holds the blocks: that copy then costs no transfer.
        """
        query = {"replication-min": str(replication.min), "replication-max": str(replication.max)}
        if name:
            query["name"] = name
        if prefer:
            query["user-allocations"] = ",".join(prefer)
        return parse_pin(self._json("POST", f"/pins/{cid}", query), cid)

    def add_car(
        self, car_path: str | os.PathLike[str], replication: Replication, *, root: CID | None = None,
        name: str = "", timeout: float = 600.0,
    ) -> Pin:
        """`POST /add?format=car`: the cluster peer reads the CAR (one root), sends every block to
        the Kubo node of each peer it allocates the pin to, then pins it there. No Kubo RPC is
        needed on the publisher's side, only this REST API; the answer names the allocations."""
        size = os.path.getsize(car_path)
        boundary = "cidboot-" + os.urandom(12).hex()
        fname = urllib.parse.quote(name or os.path.basename(car_path), safe="")
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{fname}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        query = {"format": "car", "replication-min": str(replication.min),
                 "replication-max": str(replication.max), "stream-channels": "false"}
        if name:
            query["name"] = name
        with open(car_path, "rb") as f:
            body = _Concat(head, f, tail)
            answer = self._json("POST", "/add", query, body=body, timeout=timeout, headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + size + len(tail)),
            })
        items = answer if isinstance(answer, list) else [answer]
        if len(items) != 1:
            raise ClusterProtocolError(f"cluster at {self.url}: /add of one CAR answered {len(items)} items")
        return parse_pin(items[0], root)

    def unpin(self, cid: CID) -> None:
        self._json("DELETE", f"/pins/{cid}")

    def allocation(self, cid: CID) -> Pin:
        """The pin as recorded in the shared state (no peer is asked): 404 if not pinned."""
        return parse_pin(self._json("GET", f"/allocations/{cid}"), cid)

    def status(self, cid: CID) -> PinStatus:
        """The pin's status on every peer (each peer is asked; a down peer shows cluster_error)."""
        return parse_status(self._json("GET", f"/pins/{cid}"), cid)

    def recover(self, cid: CID) -> PinStatus:
        """Retry a pin that failed on some peers."""
        return parse_status(self._json("POST", f"/pins/{cid}/recover"), cid)

    def wait_pinned(
        self, cid: CID, min_peers: int, *, timeout: float = 300.0, interval: float = 1.0,
        progress: Callable[[PinStatus], None] | None = None,
    ) -> PinStatus:
        """Poll the status until at least `min_peers` peers report `pinned`.

        Polls after 50 ms, then twice as long each time up to `interval`: a small image is
        pinned in well under a second, and a fixed half-second poll was most of its publish
        time (bench/bench_cluster.py). `progress` gets every status polled. Peers in `pin_error` are not a failure by
        themselves (the cluster retries and may re-allocate); the deadline is, and its error
        quotes each peer's status and error.
        """
        if min_peers < 1:
            raise BadReplication(f"wait for at least 1 peer, not {min_peers}")
        deadline = time.monotonic() + timeout
        pause = min(0.05, interval)
        while True:
            st = self.status(cid)
            if progress is not None:
                progress(st)
            if len(st.pinned) >= min_peers:
                return st
            if time.monotonic() >= deadline:
                raise ReplicationTimeout(
                    f"{cid} reached {len(st.pinned)} of {min_peers} peers in {timeout:.0f} s: {st.describe()}", st
                )
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, interval)

    def wait_for(
        self, cid: CID, replication: Replication, *, timeout: float = 300.0,
        progress: Callable[[PinStatus], None] | None = None,
    ) -> PinStatus:
        """Wait until the pin has its MIN copies (every live peer when replication is -1)."""
        want = replication.min
        if replication.everywhere:
            want = sum(1 for p in self.peers() if not p.error)
        return self.wait_pinned(cid, max(want, 1), timeout=timeout, progress=progress)
