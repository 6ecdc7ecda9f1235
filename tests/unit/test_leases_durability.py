"""The lease file (issue 11 #13, issue 13): a journal appended durably (group commit) and compacted
atomically, a crash at any byte of an append loses at most that record, and a damaged file never
stops `bootstrap serve` from starting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bootstrap.server import leases
from bootstrap.server.leases import MAGIC, LeaseDB, encode_record, parse_lease_file

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
    ip = _bind(db)  # the first binding creates the journal: a compaction, atomic
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".leases-")  # the data, before the rename
    assert synced[1] == str(tmp_path)  # then the directory: the rename is durable
    assert [(r.mac, r.ip, r.bound) for r in parse_lease_file(path.read_bytes())] == [(MAC, ip, True)]  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == ["leases.json"]  # no temporary file left
    ip2 = _bind(db, "52:54:00:00:00:01")  # the next ones: one append and one fsync of the journal itself
    assert synced[2:] == [str(path)]
    assert path.read_bytes().endswith(encode_record(db.by_mac["52:54:00:00:00:01"]))
    assert LeaseDB(*RANGE, path=path).by_mac["52:54:00:00:00:01"].ip == ip2


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


def _journal_of_three(path: Path) -> tuple[bytes, int, dict[str, str]]:
    """A journal whose first binding was a compaction and the next two appends; returns its
    bytes, the offset where the appends start, and mac -> ip."""
    db = LeaseDB(*RANGE, path=path)
    macs = [MAC, "52:54:00:00:00:01", "52:54:00:00:00:02"]
    ips = {m: _bind(db, m) for m in macs[:1]}
    start = path.stat().st_size
    ips |= {m: _bind(db, m) for m in macs[1:]}
    return path.read_bytes(), start, ips


def test_a_crash_at_any_byte_of_an_append_loses_at_most_that_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "leases.json"
    raw, start, ips = _journal_of_three(path)
    ends = [i + 1 for i in range(start, len(raw)) if raw[i:i + 1] == b"\n"]  # where each appended record ends
    assert len(ends) == 2
    for cut in range(start, len(raw) + 1):
        caplog.clear()
        path.write_bytes(raw[:cut])
        db = LeaseDB(*RANGE, path=path)
        whole = sum(1 for e in ends if e <= cut)  # appended records that reached the disk whole
        want = dict(list(ips.items())[: 1 + whole])
        assert {m: lease.ip for m, lease in db.by_mac.items()} == want, cut
        assert db.recovered is None, cut
        assert ("torn last record" in caplog.text) == (cut not in [start, *ends]), cut
        # compacted on start: the torn tail is gone, so the next append does not land after it
        assert path.read_bytes().startswith(MAGIC) and path.read_bytes().endswith(b"\n")
        assert "torn" not in str(parse_lease_file(path.read_bytes()))
    assert {m: lease.ip for m, lease in LeaseDB(*RANGE, path=path).by_mac.items()} == ips


def test_a_corrupt_record_before_the_last_moves_the_file_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "leases.json"
    raw, start, _ips = _journal_of_three(path)
    flipped = bytearray(raw)
    flipped[start + 20] ^= 0x01  # inside the second record's body: its checksum no longer matches
    path.write_bytes(bytes(flipped))
    db = LeaseDB(*RANGE, path=path)
    assert db.by_mac == {} and db.recovered is not None and db.recovered.read_bytes() == bytes(flipped)
    assert "checksum mismatch" in caplog.text and "record 2" in caplog.text and not path.exists()


def test_the_journal_is_compacted_on_start_and_when_it_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    monkeypatch.setattr(leases, "COMPACT_MIN", 8)
    db = LeaseDB(*RANGE, path=path)
    ip = _bind(db)
    sizes = []
    for _ in range(40):  # renewals: each an appended record superseding the last
        assert db.bind(MAC, ip)
        sizes.append(len(parse_lease_file(path.read_bytes())))
    assert max(sizes) <= 9 and min(sizes) == 1  # bounded: compacted back to one record per lease
    assert db.bind(MAC, ip) and len(parse_lease_file(path.read_bytes())) > 1
    monkeypatch.setattr(leases, "COMPACT_MIN", 4096)
    _bind(db, "52:54:00:00:00:01")
    db.release(MAC)
    assert len(parse_lease_file(path.read_bytes())) > 2
    again = LeaseDB(*RANGE, path=path)  # start: replayed, then one record per live lease
    assert list(again.by_mac) == ["52:54:00:00:00:01"]
    assert [r.mac for r in parse_lease_file(path.read_bytes())] == ["52:54:00:00:00:01"]  # type: ignore[union-attr]


def test_a_later_binding_of_an_address_supersedes_the_earlier_holder(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    a, b = leases.Lease(MAC, "10.0.0.10", 1.0, True), leases.Lease("52:54:00:00:00:01", "10.0.0.10", 2.0, True)
    path.write_bytes(MAGIC + encode_record(a) + encode_record(b) + encode_record("52:54:00:00:00:09"))
    assert {m: lease.ip for m, lease in LeaseDB(*RANGE, path=path).by_mac.items()} == {"52:54:00:00:00:01": "10.0.0.10"}


def test_an_old_format_lease_file_is_read_and_compacted_into_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    path.write_text(json.dumps([{"mac": MAC, "ip": "10.0.0.12", "expires": 1e12, "bound": True}]))
    db = LeaseDB(*RANGE, path=path)
    assert db.by_mac[MAC].ip == "10.0.0.12" and db.recovered is None
    assert path.read_bytes().startswith(MAGIC)


def test_group_commit_one_fsync_for_a_batch_of_bindings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    db = LeaseDB(*RANGE, path=path)
    _bind(db)  # creates the journal
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for i in range(3):
        m = f"52:54:00:00:00:0{i + 1}"
        ip = db.offer(m)
        assert ip and db.bind(m, ip, sync=False)
    assert synced == [] and len(parse_lease_file(path.read_bytes())) == 4  # written, not yet durable
    db.sync()
    db.sync()  # nothing new: no second fsync
    assert len(synced) == 1


def test_after_a_failed_append_the_next_write_compacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.json"
    db = LeaseDB(*RANGE, path=path)
    _bind(db)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: real_write(fd, b[:5]))  # ENOSPC mid-record, as a short write
    with pytest.raises(OSError, match="short write"):
        _bind(db, "52:54:00:00:00:01")
    monkeypatch.undo()
    assert db.journal is not None and db.journal.broken
    _bind(db, "52:54:00:00:00:02")  # not appended after the partial record: the journal is rewritten
    assert path.read_bytes().endswith(b"\n") and len(parse_lease_file(path.read_bytes())) == 3
    assert LeaseDB(*RANGE, path=path).recovered is None


def test_a_journal_replaced_under_its_writer_is_rewritten_not_appended_to(tmp_path: Path) -> None:
    """Opening the lease file again (an inspection, a second LeaseDB) compacts it on start, i.e.
    renames a new file over it; the first writer must not append to the unlinked old one."""
    path = tmp_path / "leases.json"
    db = LeaseDB(*RANGE, path=path)
    _bind(db)
    LeaseDB(*RANGE, path=path)  # compacts: a new file at `path`
    ip = _bind(db, "52:54:00:00:00:01")
    assert LeaseDB(*RANGE, path=path).by_mac["52:54:00:00:00:01"].ip == ip
