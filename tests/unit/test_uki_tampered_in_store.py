"""A bootstrap UKI tampered in a store is refused by the verifying gateway client, CID named.

The UKI is built as `imagebuilder build --uki` does (Debian's real x86_64 stub, kernel + initrd +
cmdline + os-release, imported as CIDv1 UnixFS with raw leaves) and added to a Blockstore. Then
one byte of the block holding its `.initrd` section is flipped *in the block file on disk*, as a
failing disk or someone with write access to a cache would.

Two gateways serve that store:
- ours, which hashes what it reads: it will not serve the damaged block (500 / a cut CAR stream)
  and the client fails naming the block's CID;
- one that serves block files as they are on disk (Kubo's default, `Datastore.HashOnRead=false`):
  it hands out the tampered bytes (the control below shows a plain HTTP GET receiving them), and
  only the client's own hash stops them, with the CID named. That second case is the one that
  proves the client's check: with the hash skipped it would store and boot the tampered UKI.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs import import_bytes
from cidboot.ipld.unixfs.exporter import iter_file_blocks
from cidboot.store.blockstore import BlockNotFound, Blockstore
from cidboot.store.gateway.client import AllGatewaysFailed, BlockUnavailable, fetch, fetch_block
from cidboot.store.gateway.server import GatewayServer
from imagebuilder import uki
from imagebuilder.layers import UNIXFS
from tests.support.gateway_fixtures import running_gateway

KERNEL = b"MZ fake bzImage " + bytes(range(256)) * 1200  # ~300 KiB: two leaves; never booted here
INITRD = b"070701 fake newc " + bytes(range(255, -1, -1)) * 2400  # ~600 KiB: spans leaves
CMDLINE = "cidboot.config=bafy-test console=ttyS0 quiet"


class HashlessStore(Blockstore):
    """A store that reads block files as they are, without hashing them (Kubo's default,
    `HashOnRead=false`): the gateway over it serves whatever is on disk."""

    def get(self, cid: CID) -> bytes:
        try:
            return self._file(cid).read_bytes()
        except FileNotFoundError:
            raise BlockNotFound(f"block {cid} is not in the store {self.path}") from None


@contextmanager
def gateway_over(store: Blockstore) -> Iterator[GatewayServer]:
    with running_gateway(store) as gw:
        yield gw


@pytest.fixture()
def tampered(tmp_path: Path) -> tuple[Path, CID, CID, bytes]:
    """(store path, UKI root CID, CID of the tampered leaf, the UKI's true bytes)."""
    image = uki.build_uki(uki.stub_path("amd64").read_bytes(), KERNEL, INITRD, CMDLINE,
                          uki.os_release("hello", 1))
    store = Blockstore(tmp_path / "store")
    root = import_bytes(image, store, UNIXFS).cid
    # which leaf holds the .initrd section: walk the leaves in file order (raw leaves, 256 KiB)
    initrd = next(s for s in uki.parse_pe(image).sections if s.name == ".initrd")
    target = initrd.raw_offset + initrd.raw_size // 2
    offset, leaf = 0, None
    for cid, block, _ in iter_file_blocks(root, store.get, 0, len(image)):
        if cid.codec == 0x55:  # raw leaf: file bytes
            if offset <= target < offset + len(block):
                leaf = cid
                break
            offset += len(block)
    assert leaf is not None and leaf != root
    path = store._file(leaf)
    data = bytearray(path.read_bytes())
    data[target - offset] ^= 0x01
    path.write_bytes(bytes(data))
    return tmp_path / "store", root, leaf, image


def test_our_gateway_will_not_serve_it_and_the_client_names_the_cid(tampered: tuple[Path, CID, CID, bytes],
                                                                     tmp_path: Path) -> None:
    store_path, root, leaf, _ = tampered
    with gateway_over(Blockstore(store_path)) as gw:
        local = Blockstore(tmp_path / "device")
        with pytest.raises(AllGatewaysFailed) as ei:
            fetch(root, [gw.url], local, timeout=5, rounds=1, backoff=0)
        with pytest.raises(BlockUnavailable) as bi:
            fetch_block(leaf, [gw.url], local, timeout=5, rounds=1, backoff=0)
    assert str(leaf) in str(ei.value), ei.value
    assert str(leaf) in str(bi.value) and "verification" in str(bi.value), bi.value
    assert not local.has(leaf)


def test_a_hashless_gateway_serves_it_and_the_client_refuses_it_naming_the_cid(
        tampered: tuple[Path, CID, CID, bytes], tmp_path: Path) -> None:
    store_path, root, leaf, image = tampered
    with gateway_over(HashlessStore(store_path)) as gw:
        # control: the gateway really hands out the tampered bytes, so what refuses them below is
        # the client's own hash, not the server
        with urllib.request.urlopen(f"{gw.url}/ipfs/{leaf}?format=raw", timeout=10) as r:
            served = r.read()
        assert not leaf.multihash.matches(served)
        # one byte off the UKI's own bytes at that place: a client that trusted it would boot this
        at = image.find(served[:64])
        assert at >= 0 and sum(a != b for a, b in zip(served, image[at:at + len(served)], strict=True)) == 1

        local = Blockstore(tmp_path / "device")
        with pytest.raises(BlockUnavailable) as bi:
            fetch_block(leaf, [gw.url], local, timeout=5, rounds=1, backoff=0)
        assert bi.value.lied and str(leaf) in str(bi.value), bi.value
        with pytest.raises(AllGatewaysFailed) as ei:
            fetch(root, [gw.url], local, timeout=5, rounds=1, backoff=0)
        assert ei.value.lied and str(leaf) in str(ei.value), ei.value
    assert not local.has(leaf)
