"""Our UnixFS importer gives exactly the CIDs a real Kubo gives for the same bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cidboot.ipld.unixfs import ImportOptions, import_file, import_path
from tests.support.kubo_node import KuboNode

pytestmark = pytest.mark.kubo

CHUNK = 256 * 1024
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 174 * CHUNK - 1, 174 * CHUNK, 174 * CHUNK + 1]
PROFILES = {
    "default (CIDv0, dag-pb leaves)": ([], ImportOptions()),
    "cid-version 1 (raw leaves)": (["--cid-version=1"], ImportOptions(cid_version=1)),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("sizes")
    rng = random.Random(20261122)
    out = {}
    for n in SIZES:
        p = d / f"f{n}.bin"
        p.write_bytes(rng.randbytes(n))
        out[n] = p
    return out


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("size", SIZES)
def test_file_cids_match_kubo(kubo: KuboNode, files: dict[int, Path], profile: str, size: int) -> None:
    args, opts = PROFILES[profile]
    theirs = kubo.ipfs("add", "-Q", "--only-hash", *args, str(files[size])).strip()
    ours = import_file(files[size], None, opts)
    assert str(ours.cid) == theirs
    assert ours.size == size


@pytest.mark.parametrize(
    "args, opts",
    [
        (["--chunker=size-1000"], ImportOptions(chunk_size=1000)),
        (["--chunker=size-65536", "--cid-version=1"], ImportOptions(cid_version=1, chunk_size=65536)),
        (["--raw-leaves"], ImportOptions(raw_leaves=True)),
        (["--cid-version=1", "--raw-leaves=false"], ImportOptions(cid_version=1, raw_leaves=False)),
    ],
)
def test_chunker_and_leaf_options_match_kubo(kubo: KuboNode, tmp_path: Path, args: list[str], opts: ImportOptions) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(random.Random(7).randbytes(3 * 174 * 1000 + 17))
    assert str(import_file(p, None, opts).cid) == kubo.ipfs("add", "-Q", "--only-hash", *args, str(p)).strip()


def make_tree(root: Path) -> None:
    rng = random.Random(3)
    (root / "etc" / "cidboot").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "empty-dir").mkdir()
    (root / "etc" / "cidboot" / "boot.cbor").write_bytes(rng.randbytes(3000))
    (root / "bin" / "agent").write_bytes(rng.randbytes(600_000))
    (root / "README").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "Zebra").write_text("capitals sort first\n")
    (root / "ünïcode name").write_text("utf-8 names\n")
    (root / "link").symlink_to("bin/agent")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_directory_tree_matches_kubo(kubo: KuboNode, tmp_path: Path, profile: str) -> None:
    args, opts = PROFILES[profile]
    make_tree(tmp_path / "tree")
    theirs = kubo.ipfs("add", "-r", "-Q", "--only-hash", *args, str(tmp_path / "tree")).strip()
    assert str(import_path(tmp_path / "tree", None, opts).cid) == theirs
