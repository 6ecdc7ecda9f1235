"""Concurrent builds over one cache: each unpacks the pinned .debs (and wheels) aside and renames the
tree into place whole, so no build ever sees, or leaves, a tree another build is still writing.
(A shared temporary name once let the second build remove the first's half-written tree, which
the first then marked complete: a sysroot without its stdlib.)"""

from __future__ import annotations

import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagebuilder import initramfs
from imagebuilder.debpkg import DebFile


def _four_at_once(unpack: Callable[[], Path]) -> list[Path]:
    """The trees four threads got from `unpack` run at the same time."""
    roots: list[Path] = []
    threads = [threading.Thread(target=lambda: roots.append(unpack())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return roots


def test_concurrent_sysroots_are_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_deb(deb: Path) -> Iterator[DebFile]:
        for i in range(20):
            time.sleep(0.005)  # interleave the builds' unpacking
            yield DebFile(path=f"usr/lib/{deb.stem}/f{i}", kind="file", mode=0o644, data=b"x", target="")

    monkeypatch.setattr(initramfs, "read_deb", slow_deb)
    debs = [tmp_path / "a.deb", tmp_path / "b.deb", tmp_path / "c.deb"]
    roots = _four_at_once(lambda: initramfs.stage_sysroot(debs, tmp_path / "sr"))
    assert len(set(roots)) == 1 and len(roots) == 4
    files = sorted(p.relative_to(roots[0]).as_posix() for p in roots[0].rglob("*") if p.is_file())
    assert files == [".complete", *sorted(f"usr/lib/{d}/f{i}" for d in "abc" for i in range(20))]
    assert [p.name for p in (tmp_path / "sr").iterdir()] == [roots[0].name], "a temporary tree was left behind"


def test_concurrent_wheel_unpacks_are_whole(tmp_path: Path) -> None:
    whl = tmp_path / "w.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for i in range(200):
            z.writestr(f"pkg/m{i}.py", f"X = {i}\n")
    roots = _four_at_once(lambda: initramfs.unpack_wheel(whl, tmp_path / "wh"))
    assert len(set(roots)) == 1 and len(roots) == 4
    assert len(list((roots[0] / "pkg").iterdir())) == 200 and (roots[0] / "pkg/m199.py").read_text() == "X = 199\n"
    assert [p.name for p in (tmp_path / "wh").iterdir()] == [roots[0].name]
