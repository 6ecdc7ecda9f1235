"""dag-pb and UnixFS: strict decoding, export of files/directories, HAMT-sharded directories
built by a real Kubo."""

from __future__ import annotations

from pathlib import Path

import pytest

from cidboot.ipld import dagpb
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, DAG_PB
from cidboot.ipld.unixfs import (
    export_file,
    list_dir,
)
from cidboot.ipld.unixfs.data import UnixFSData
from cidboot.store.blockstore import Blockstore
from tests.support.kubo_node import KuboNode


@pytest.mark.kubo
def test_reads_hamt_sharded_directory_made_by_kubo(kubo: KuboNode, tmp_path: Path) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    names = [f"entry-{i:04d}-{'x' * (i % 7)}" for i in range(600)]
    for n in names:
        (tree / n).write_text(n)
    # A second, daemon-less Kubo repo with a low threshold shards this directory (HAMT,
    # fanout 256, murmur3); the shared daemon keeps Kubo's default so other tests are unaffected.
    import io
    import os
    import subprocess

    env = {**os.environ, "IPFS_PATH": str(tmp_path / "repo")}

    def ipfs(*args: str) -> bytes:
        return subprocess.run([kubo.binary, *args], env=env, check=True, capture_output=True).stdout

    ipfs("init", "--profile", "test", "--empty-repo")
    ipfs("config", "Import.UnixFSHAMTDirectorySizeThreshold", "1KiB")
    root = CID.parse(ipfs("add", "-r", "-Q", "--offline", "--cid-version=1", str(tree)).decode().strip())
    s = Blockstore(tmp_path / "s")
    car = ipfs("dag", "export", "--offline", str(root))

    for cid, block in CarReader(io.BytesIO(car)):
        s.put(cid, block)
    assert UnixFSData.decode(dagpb.decode(s.get(root)).data).type == 5  # really a HAMT shard
    entries = list_dir(root, s.get)
    assert [e.name for e in entries] == sorted(names)
    e = entries[123]
    assert b"".join(export_file(e.cid, s.get)) == e.name.encode()
    assert root.codec == DAG_PB
