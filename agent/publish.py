"""Publishing an agent's results to IPFS: `--publish kubo=URL`.

Results, their provenance and audit blocks live in the agent's Blockstore first (served on
/ipfs/ at once); publishing copies each result's whole provenance DAG to a Kubo node and pins
its root, so the graph outlives the device. cidboot.store.kubo (ipfshttpclient) is imported only
when publishing is asked for: the device image does not carry it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID
from cidboot.ipld.dag import walk
from cidboot.store.blockstore import Blockstore


@dataclass(frozen=True)
class PublishTarget:
    kind: str
    url: str

    @classmethod
    def parse(cls, spec: str) -> PublishTarget:
        kind, sep, url = spec.partition("=")
        if kind != "kubo" or not sep or not url.startswith("http"):
            raise FormatError(f"--publish takes kubo=http://HOST:PORT, got {spec!r}")
        return cls(kind, url)


def publish(store: Blockstore, roots: Iterable[CID], target: PublishTarget, *, client: Any = None) -> int:
    """Copy every block under each root to the target and pin the roots; returns blocks sent."""
    if client is None:
        from cidboot.store.kubo import KuboClient

        client = KuboClient(target.url)
    sent = 0
    for root in roots:
        for cid, data in walk(root, store.get):
            client.put(cid, data)
            sent += 1
        client.pin(root)
    return sent
