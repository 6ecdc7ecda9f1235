"""Kubo backend: publish, pin and fetch through a real IPFS node's RPC (via ipfshttpclient).

ipfshttpclient 0.7.0 is the newest release, and its `connect()` refuses every Kubo newer than
0.8 ("Unsupported daemon version"). The RPC itself is still compatible for what we use, so we
construct `ipfshttpclient.Client` directly, which skips only that version assertion, and
check the daemon answers `version`. Two calls changed since 0.7.0 was written: `block/put`
now takes `cid-codec` (not `format`), and `dag import` has no wrapper; both go through the
client's own low-level `_client.request` with the same multipart encoder it uses for `add`,
so there is still only one HTTP stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ipfshttpclient
from ipfshttpclient import multipart

from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID, CODEC_NAMES, RAW


class KuboError(CidbootError):
    """The Kubo node refused a request or cannot be reached."""


def api_multiaddr(url: str) -> str:
    """`http://127.0.0.1:5001` -> `/ip4/127.0.0.1/tcp/5001/http` (what ipfshttpclient takes)."""
    if url.startswith("/"):
        return url
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or not u.port:
        raise KuboError(f"Kubo API URL must be http://HOST:PORT, got {url!r}")
    proto = "ip6" if ":" in u.hostname else ("ip4" if u.hostname.replace(".", "").isdigit() else "dns")
    return f"/{proto}/{u.hostname}/tcp/{u.port}/{u.scheme}"


@dataclass(frozen=True)
class AddResult:
    cid: CID
    size: int
    name: str


class KuboClient:
    def __init__(self, api_url: str = "http://127.0.0.1:5001", *, timeout: float = 120) -> None:
        self.api_url = api_url
        try:
            # Not ipfshttpclient.connect(): see the module docstring.
            self._c = ipfshttpclient.Client(api_multiaddr(api_url), timeout=timeout)
        except ipfshttpclient.exceptions.Error as e:
            raise KuboError(f"cannot create a client for {api_url}: {e}") from None

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except ipfshttpclient.exceptions.Error as e:
            raise KuboError(f"Kubo at {self.api_url}: {e}") from None

    def version(self) -> str:
        return str(self._call(self._c.version)["Version"])

    def add_file(
        self, path: str | os.PathLike[str], *, cid_version: int = 0, chunker: str | None = None,
        raw_leaves: bool | None = None, only_hash: bool = False, pin: bool = True,
    ) -> AddResult:
        """`ipfs add` (recursive for directories); returns the root."""
        p = Path(path)
        kw: dict[str, Any] = {"cid_version": cid_version, "only_hash": only_hash, "pin": pin}
        if chunker:
            kw["chunker"] = chunker
        # The `ipfs` CLI turns raw leaves on with CIDv1; the RPC does not, so say it explicitly
        # or the same file gets a different CID than `ipfs add --cid-version=1` prints.
        kw["raw_leaves"] = (cid_version == 1) if raw_leaves is None else raw_leaves
        res = self._call(self._c.add, str(p), recursive=p.is_dir(), **kw)
        last = res[-1] if isinstance(res, list) else res
        return AddResult(CID.parse(last["Hash"]), int(last.get("Size", 0)), last.get("Name", ""))

    def block_put(self, data: bytes, codec: int = RAW, *, pin: bool = False) -> CID:
        body, headers = multipart.stream_bytes(data)
        opts = {"cid-codec": CODEC_NAMES[codec], "mhtype": "sha2-256", "pin": str(pin).lower()}
        res = self._call(self._c._client.request, "/block/put", decoder="json", data=body, headers=headers, opts=opts)
        return CID.parse(res[0]["Key"] if isinstance(res, list) else res["Key"])

    def dag_import(self, car_path: str | os.PathLike[str], *, pin_roots: bool = True) -> list[CID]:
        body, headers = multipart.stream_files(str(car_path))
        res = self._call(
            self._c._client.request, "/dag/import", decoder="json", data=body, headers=headers,
            opts={"pin-roots": str(pin_roots).lower()},
        )
        roots = []
        for item in res if isinstance(res, list) else [res]:
            if "Root" in item:
                roots.append(CID.parse(item["Root"]["Cid"]["/"]))
        return roots

    def pin(self, cid: CID) -> None:
        self._call(self._c.pin.add, str(cid))

    def cat(self, cid: CID) -> bytes:
        return bytes(self._call(self._c.cat, str(cid)))

    def get_block(self, cid: CID) -> bytes:
        """A block from Kubo, verified against its CID (the node is not trusted either)."""
        data = bytes(self._call(self._c.block.get, str(cid)))
        cid.verify(data)
        return data

    def put(self, cid: CID, data: bytes) -> None:
        """BlockSink interface: lets the UnixFS importer and `imagebuilder` write straight to Kubo."""
        got = self.block_put(data, cid.codec)
        if got.multihash != cid.multihash:
            raise KuboError(f"Kubo stored {got} for block {cid}")

    def close(self) -> None:
        self._c.close()

    def iter_blocks(self, cids: list[CID]) -> Iterator[tuple[CID, bytes]]:
        for c in cids:
            yield c, self.get_block(c)
