"""`python -m qemu.harness boot` from a user's own directory (docs/first-flow.md, step 7): a
relative --out used to reach `imagebuilder build`, which runs with cwd = the repo ("cannot read:
No such file or directory"), and an --out inside the flow's directory was copied into itself
until RecursionError."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from cidboot.errors import CidbootError
from qemu.harness.commands import boot as boot_cmd


class _Stop(Exception):
    pass


def _args(flow: Path, out: Path) -> argparse.Namespace:
    return argparse.Namespace(flow=str(flow), out=out, store=None, keys=[], devices=1, keep=False,
                              legacy=False, timeout=1.0)


def _flow(tmp_path: Path) -> Path:
    flow = tmp_path / "word-count" / "flow.yaml"
    flow.parent.mkdir()
    flow.write_text("name: x\n")
    return flow


def test_relative_out_reaches_the_builds_as_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_prepare(flow: Path, work: Path, **_kw: Any) -> None:
        seen["work"] = work
        raise _Stop

    monkeypatch.setattr(boot_cmd, "prepare", fake_prepare)
    monkeypatch.chdir(tmp_path)
    _flow(tmp_path)
    with pytest.raises(_Stop):
        boot_cmd.boot(_args(Path("word-count/flow.yaml"), Path("boot-out")))
    assert seen["work"] == tmp_path.resolve() / "boot-out" / "work"


def test_out_inside_the_flow_directory_is_refused_before_anything_is_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot_cmd, "prepare", lambda *_a, **_k: pytest.fail("prepare ran"))
    monkeypatch.chdir(tmp_path)
    _flow(tmp_path)
    for out in (Path("word-count/out"), Path("word-count")):
        with pytest.raises(CidbootError, match="inside the flow's directory"):
            boot_cmd.boot(_args(Path("word-count/flow.yaml"), out))
        assert not (tmp_path / "word-count" / "out").exists()
