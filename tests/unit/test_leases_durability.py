"""The lease file (issue 11 #13): written atomically and durably, and a damaged one never stops
`bootstrap serve` from starting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bootstrap.server.leases import LeaseDB

MAC = "52:54:00:12:34:56"
RANGE = ("10.0.0.10", "10.0.0.20")


def _bind(db: LeaseDB, mac: str = MAC) -> str:
    ip = db.offer(mac)
    assert ip and db.bind(mac, ip)
    return ip


def test_empty_lease_file_does_not_stop_serve_from_starting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "leases.json"
    path.write_bytes(b"")  # what a crash between create and write left behind
    db = LeaseDB(*RANGE, path=path)  # what BootServer builds from --state-dir on start
    assert db.by_mac == {} and db.recovered is not None
    assert db.recovered.name.startswith("leases.json.damaged-") and db.recovered.read_bytes() == b""
    assert "damaged lease file" in caplog.text and "empty" in caplog.text
    ip = _bind(db)
    assert LeaseDB(*RANGE, path=path).by_mac[MAC].ip == ip  # and it works from then on


@pytest.mark.parametrize("raw, why", [
    (b'[{"mac": "52:54:00:12:34:56", "ip": "10.0.0.1', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b'{"mac": "x"}', "a list of leases expected"),
    (b'[{"mac": "x", "ip": "10.0.0.10"}]', "lease 0: not a map"),
    (b'[{"mac": "x", "ip": "10.0.0.10", "expires": "soon", "bound": true}]', "lease 0: wrong types"),
    (b'[{"mac": "x", "ip": "10.0.0.300", "expires": 1, "bound": true}]', "lease 0:"),
])
def test_damaged_lease_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture, raw: bytes, why: str) -> None:
    path = tmp_path / "leases.json"
    path.write_bytes(raw)
    db = LeaseDB(*RANGE, path=path)
    assert db.by_mac == {} and db.recovered is not None and db.recovered.read_bytes() == raw
    assert not path.exists() and why in caplog.text


def test_lease_file_is_written_atomically_with_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    db = LeaseDB(*RANGE, path=path)
    ip = _bind(db)
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".leases-")  # the data, before the rename
    assert synced[1] == str(tmp_path)  # then the directory: the rename is durable
    assert json.loads(path.read_text())[0]["ip"] == ip
    assert [p.name for p in tmp_path.iterdir()] == ["leases.json"]  # no temporary file left


def test_interrupted_save_leaves_the_old_file_and_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    db = LeaseDB(*RANGE, path=path)
    ip = _bind(db)
    (tmp_path / ".leases-crashed").write_text("[")  # a save a crash interrupted
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        _bind(db, "52:54:00:00:00:01")
    monkeypatch.undo()
    assert LeaseDB(*RANGE, path=path).by_mac[MAC].ip == ip  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["leases.json"]
