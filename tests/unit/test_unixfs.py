"""dag-pb and UnixFS: strict decoding, export of files/directories, HAMT-sharded directories
built by a real Kubo."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cidboot.errors import NotFoundError
from cidboot.ipld import dagpb
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.unixfs import (
    ImportOptions,
    UnixFSError,
    export_file,
    import_bytes,
    import_path,
    list_dir,
    resolve_path,
)
from cidboot.ipld.unixfs.data import UnixFSData
from cidboot.ipld.unixfs.exporter import is_symlink
from cidboot.store.blockstore import Blockstore


def test_dagpb_round_trip_and_canonical_order() -> None:
    link = dagpb.PBLink(CID.of(b"x", RAW), "name", 42)
    node = dagpb.PBNode([link, dagpb.PBLink(CID.of(b"y", RAW))], b"\x08\x01")
    raw = dagpb.encode(node)
    assert dagpb.decode(raw) == node
    assert raw.index(b"\x0a\x02\x08\x01") > raw.index(b"\x12")  # Links before Data


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"\x0a\x02\x08\x01\x12\x00", "Links after Data"),
        (b"\x0a\x00\x0a\x00", "Data appears twice"),
        (b"\x1a\x00", "unexpected field 3"),
        (b"\x0a\x05\x08", "runs past the end"),
        (b"\x12\x00", "missing Hash"),
        (b"\x12\x03\x0a\x01\x00", "bad Hash"),
        (b"\x08\x01", "unexpected field 1"),
        (b"\x0b", "wire type 3"),
        (b"\x12\x04\x12\x00\x0a\x00", "out of order"),
    ],
)
def test_dagpb_rejects_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(dagpb.DagPbError, match=why):
        dagpb.decode(raw)


def test_unixfs_data_rejects_garbage() -> None:
    with pytest.raises(UnixFSError, match="unknown Type"):
        UnixFSData.decode(b"\x08\x09")
    with pytest.raises(UnixFSError, match="no Data"):
        UnixFSData.decode(None)
    with pytest.raises(UnixFSError, match="unexpected field 9"):
        UnixFSData.decode(b"\x08\x02\x48\x01")


@pytest.mark.parametrize("opts", [ImportOptions(chunk_size=1000), ImportOptions(cid_version=1, chunk_size=1000)])
@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 174_000, 174_001, 400_000])
def test_export_returns_the_imported_bytes(tmp_path: Path, opts: ImportOptions, size: int) -> None:
    s = Blockstore(tmp_path)
    data = random.Random(size).randbytes(size)
    r = import_bytes(data, s, opts)
    assert b"".join(export_file(r.cid, s.get)) == data


def test_directory_export_and_paths(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "c.txt").write_text("deep\n")
    (tree / "z.txt").write_text("z\n")
    (tree / ".hidden").write_text("skipped by default, as in Kubo\n")
    (tree / "ln").symlink_to("z.txt")
    s = Blockstore(tmp_path / "s")
    root = import_path(tree, s).cid
    assert [e.name for e in list_dir(root, s.get)] == ["a", "ln", "z.txt"]
    assert b"".join(export_file(resolve_path(root, "a/b/c.txt", s.get), s.get)) == b"deep\n"
    assert is_symlink(resolve_path(root, "ln", s.get), s.get)
    with pytest.raises(NotFoundError, match="no entry"):
        resolve_path(root, "a/nope", s.get)
    with pytest.raises(UnixFSError, match="not a file"):
        list(export_file(root, s.get))
    with pytest.raises(UnixFSError, match="not a directory"):
        list_dir(resolve_path(root, "z.txt", s.get), s.get)


def test_import_options_validation() -> None:
    with pytest.raises(UnixFSError, match="only size-N"):
        ImportOptions.parse_chunker("rabin-1-2-3")
    with pytest.raises(UnixFSError, match="out of range"):
        ImportOptions.parse_chunker("size-0")
    with pytest.raises(UnixFSError, match="cid version"):
        ImportOptions(cid_version=2)


