"""`imagebuilder gc` (unpinned blocks out of the store) and `imagebuilder cache prune` (the
build cache): what they remove, what they keep, and the sizes they report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.unixfs.importer import import_bytes
from cidboot.store.blockstore import Blockstore
from imagebuilder.cache import BuildCache
from imagebuilder.cli import main


def gc(capsys: pytest.CaptureFixture[str], store: Path, *argv: str) -> dict[str, object]:
    assert main(["gc", "--store", str(store), "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_gc_removes_only_unpinned_blocks_and_reports_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Blockstore(tmp_path / "s")
    layer = import_bytes(os.urandom(600_000), store)  # a file root and its raw leaves
    doc = store.put_block(dagcbor.encode({"layer": layer.cid, "note": "pinned root"}), DAG_CBOR)
    store.pin(doc)
    junk = [store.put_block(os.urandom(1000 + i), RAW) for i in range(3)]
    orphan = import_bytes(os.urandom(300_000), store)  # a whole unpinned DAG
    orphan_blocks = [b for b in store.multihashes() if not _reachable(store, doc, b)]
    expected_bytes = sum(store.size(CID(1, RAW, mh)) for mh in orphan_blocks)

    dry = gc(capsys, tmp_path / "s", "--dry-run")
    assert dry == {"pins": 1, "kept": dry["kept"], "removed": len(orphan_blocks), "bytes": expected_bytes,
                   "dry_run": True}
    assert all(store.has(c) for c in junk)  # a dry run removes nothing

    done = gc(capsys, tmp_path / "s")
    assert done["removed"] == len(orphan_blocks) and done["bytes"] == expected_bytes
    assert not any(store.has(c) for c in junk) and not store.has(orphan.cid)
    assert store.get(doc) and b"".join(_export(store, layer.cid))  # the pinned DAG is whole
    assert main(["gc", "--store", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.startswith("removed 0 blocks (0 B); kept ")


def test_gc_with_a_pin_whose_dag_is_incomplete_removes_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    store = Blockstore(tmp_path / "s")
    child = store.put_block(b"child", RAW)
    root = store.put_block(dagcbor.encode({"c": child}), DAG_CBOR)
    store.pin(root)
    store.delete(child)  # damage: the pinned DAG lost a block
    junk = store.put_block(b"junk", RAW)
    assert main(["gc", "--store", str(tmp_path / "s")]) == 1
    assert "not in the store" in capsys.readouterr().err and store.has(junk)


def _reachable(store: Blockstore, root: CID, mh: object) -> bool:
    from cidboot.ipld import dag

    return any(c.multihash == mh for c, _ in dag.walk(root, store.get))


def _export(store: Blockstore, cid: CID) -> list[bytes]:
    from cidboot.ipld.unixfs import export_file

    return list(export_file(cid, store.get))


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CIDBOOT_BUILD_CACHE", raising=False)
    return tmp_path / "xdg" / "cidboot"


def test_cache_prune_older_than_keeps_recently_used_layers(cache_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = BuildCache(cache_home / "layers")
    for k in ("old", "used", "new"):
        cache.put(k, k.encode() * 1000)
    old = time.time() - 10 * 86400
    for k in ("old", "used"):
        os.utime(cache_home / "layers" / k, (old, old))
    assert cache.get("used") == b"used" * 1000  # a hit counts as use
    (cache_home / "sysroots" / "abc" / "usr").mkdir(parents=True)
    (cache_home / "sysroots" / "abc" / "usr" / "f").write_bytes(b"x" * 5000)

    assert main(["cache", "prune", "--older-than", "7d", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == 1 and out["bytes"] == 3000 and out["kept"] == 2
    assert sorted(p.name for p in (cache_home / "layers").iterdir()) == ["new", "used"]
    assert (cache_home / "sysroots" / "abc").exists()  # default: layers only

    assert main(["cache", "prune", "--kind", "all", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would free 11.7 KiB (3 entries)")
    assert main(["cache", "prune", "--kind", "all"]) == 0
    assert capsys.readouterr().out.startswith("freed 11.7 KiB (3 entries)")
    assert not any((cache_home / "layers").iterdir()) and not any((cache_home / "sysroots").iterdir())
    assert cache.get("new") is None  # a pruned entry is a miss


def test_cache_prune_bad_age_is_a_usage_error(cache_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune", "--older-than", "soon"]) == 2
    assert "--older-than" in capsys.readouterr().err


def _aged_layers(cache_home: Path, ages_days: dict[str, float], size: int = 1000) -> BuildCache:
    cache = BuildCache(cache_home / "layers")
    now = time.time()
    for k, days in ages_days.items():
        cache.put(k, b"x" * size)
        t = now - days * 86400
        os.utime(cache_home / "layers" / k, (t, t))
    return cache


def test_cache_prune_max_size_keeps_the_most_recently_used(cache_home: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cache = _aged_layers(cache_home, {"a": 4, "b": 3, "c": 2, "d": 1})
    assert cache.get("a") is not None  # a hit makes the oldest the newest
    assert main(["cache", "prune", "--max-size", "2.5K", "--json"]) == 0  # 2560 bytes: two 1000-byte entries
    out = json.loads(capsys.readouterr().out)
    assert (out["removed"], out["bytes"], out["kept"], out["kept_bytes"]) == (2, 2000, 2, 2000)
    assert sorted(p.name for p in (cache_home / "layers").iterdir()) == ["a", "d"]

    # with --older-than too, an entry must pass both: "d" fits but is older than 12 h
    assert main(["cache", "prune", "--max-size", "1G", "--older-than", "12h"]) == 0
    assert sorted(p.name for p in (cache_home / "layers").iterdir()) == ["a"]


def test_prune_never_removes_what_the_running_build_used(tmp_path: Path) -> None:
    from imagebuilder.cache import prune

    d = tmp_path / "layers"
    cache = BuildCache(d)
    for k in ("old", "mine1", "mine2"):
        cache.put(k, b"y" * 1000)
    t = time.time() - 3600
    os.utime(d / "old", (t, t))
    res = prune([d], max_bytes=500, keep_since=time.time() - 60)  # a cap below one build's own layers
    assert res.entries == 1 and res.removed == [str(d / "old")]
    assert sorted(p.name for p in d.iterdir()) == ["mine1", "mine2"]


def test_cache_sizes_are_checked(cache_home: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from imagebuilder.commands.cache import layer_cache_max, parse_size

    assert main(["cache", "prune", "--max-size", "lots"]) == 2
    assert "--max-size" in capsys.readouterr().err
    assert [parse_size(t) for t in ("512", "1k", "1.5M", "8G", "8GiB", "2gb")] == \
        [512, 1024, 3 << 19, 8 << 30, 8 << 30, 2 << 30]
    monkeypatch.setenv("CIDBOOT_LAYER_CACHE_MAX", "off")
    assert layer_cache_max() is None
    monkeypatch.delenv("CIDBOOT_LAYER_CACHE_MAX")
    assert layer_cache_max() == 8 << 30
    monkeypatch.setenv("CIDBOOT_LAYER_CACHE_MAX", "eight gigs")
    assert main(["build", str(cache_home / "no-such-flow.yaml")]) == 2  # refused before any build work
    assert "CIDBOOT_LAYER_CACHE_MAX" in capsys.readouterr().err
