"""Pack files beside the flatfs directory: where a large batch (a fetch) puts its blocks.

A flatfs store costs one file per block; creating a file is the dearest part of writing a
256 KiB block on some file systems (ext4 without a journal scans for an inode not recently
deleted: ~0.1-0.3 ms per file on the bench machine, more than writing the block's bytes). A
batch writer therefore puts its first blocks in flatfs files, as ever, and from then on
appends blocks to one pack file:

    packs/<stamp>.pack   the blocks' bytes, one after the other
    packs/<stamp>.idx    JSON {"version": 1, "blocks": [[multihash hex, offset, length], ...]}

The index is written (temp file + rename) when the batch ends, before the batch's one sync.
Nothing in a pack or an index is trusted: every read hashes the bytes against the CID asked
for (verify-on-read, as for flatfs files), so an index that names bytes a crash kept off the
disk, or a torn pack, gives a block that is refused as damaged and fetched again, never a
wrong block. A pack whose index did not get written (a crash mid-batch) is invisible, and `gc`
removes it once no writer holds its lock. Other processes see a batch's pack blocks when its
index appears (they re-read the indexes when the directory changes and a block is missing).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

#: a batch writes its first this many blocks as flatfs files (a small fetch makes no pack)
FLATFS_FIRST = 16
MAX_LENGTH = 4 * 1024 * 1024  # an index entry longer than the block size limit is refused


def read_into_buffer(fd: int, buf: bytearray, size: int, offset: int) -> memoryview:
    """Up to `size` bytes of `fd` from `offset` into `buf` (a new bytearray when it is too
    small); a view of what was read (short if the file is). A size above the block limit is
    read only to just past it: such a file cannot hash to its CID, and `get` reports it."""
    size = min(size, MAX_LENGTH + 1)
    if len(buf) < size:
        buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:size]], offset + got)
        if not n:
            break
        got += n
    return view[:got]


@dataclass(frozen=True)
class Entry:
    """Where one block's bytes are: pack name (without suffix), offset, length."""

    pack: str
    offset: int
    length: int


class PackIndex:
    """The packs of one store: which multihash is where, and reading it back (unverified: the
    caller hashes). Thread-safe; one per Blockstore."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self._entries: dict[bytes, Entry] = {}  # published (.idx) and this process's live packs
        self._live: dict[str, dict[bytes, Entry]] = {}  # packs being written in this process
        self._fds: dict[str, int] = {}  # read fds, one per pack
        self._seen: tuple[int, tuple[str, ...]] | None = None  # what the last load saw (None: never)

    # -- reading -------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, tuple[str, ...]]:
        """The directory's mtime and its indexes' names: a new pack always changes the names
        (an mtime alone can miss a change made within the same clock tick as the last load)."""
        try:
            mtime = os.stat(self.dir).st_mtime_ns
            return mtime, tuple(sorted(n[:-4] for n in os.listdir(self.dir) if n.endswith(".idx")))
        except FileNotFoundError:
            return 0, ()

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the indexes if the directory changed since the last load (one stat and one
        listing of a small directory when it did not)."""
        stamp = self._stamp()
        if not force and stamp == self._seen:
            return
        entries: dict[bytes, Entry] = {}
        names = list(stamp[1])
        for name in names:  # sorted by stamp: a later pack's copy of a block wins
            for key, e in self._load(name).items():
                entries[key] = e
        with self._lock:
            for live in self._live.values():
                entries.update(live)
            self._entries = entries
            self._seen = stamp
            for name in [n for n in self._fds if n not in names and n not in self._live]:
                os.close(self._fds.pop(name))

    def _load(self, name: str) -> dict[bytes, Entry]:
        try:
            doc = json.loads((self.dir / f"{name}.idx").read_bytes())
            out = {}
            for mh, off, length in doc["blocks"]:
                if not (isinstance(off, int) and isinstance(length, int) and 0 <= off and 0 <= length <= MAX_LENGTH):
                    raise ValueError(f"bad entry {mh} {off} {length}")
                out[bytes.fromhex(mh)] = Entry(name, off, length)
            return out
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:  # a torn index: its blocks count as absent
            import logging  # only here: a boot stage's start-up does not import logging for nothing

            logging.getLogger("cidboot.store.packs").warning("ignoring damaged pack index %s: %s",
                                                             self.dir / f"{name}.idx", e)
            return {}

    def lookup(self, key: bytes) -> Entry | None:
        e = self._entries.get(key)
        if e is None:
            self.refresh()
            e = self._entries.get(key)
        return e

    def known(self, key: bytes) -> Entry | None:
        """`lookup` in the indexes as last loaded, without looking at the directory: for a caller
        that asks about many absent blocks and may miss one another process just published
        (an import's `skip_present`, which then writes a second copy). `lookup`'s refresh on
        each miss lists the directory: ~25 us a miss with one pack here, ~300 us with 200."""
        return self._entries.get(key)

    def read(self, e: Entry) -> bytes | None:
        """The bytes the entry names (as many as the pack has), or None if the pack is gone."""
        fd = self._fd(e.pack)
        return None if fd is None else os.pread(fd, e.length, e.offset)

    def read_into(self, e: Entry, buf: bytearray) -> memoryview | None:
        """`read` into `buf` (Blockstore.get_into): a view of the bytes, or None if the pack is gone."""
        fd = self._fd(e.pack)
        return None if fd is None else read_into_buffer(fd, buf, e.length, e.offset)

    def _fd(self, pack: str) -> int | None:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                try:
                    fd = os.open(self.dir / f"{pack}.pack", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                self._fds[pack] = fd
        return fd

    def keys(self) -> list[bytes]:
        self.refresh()
        return list(self._entries)

    # -- writing (BatchWriter) -----------------------------------------------------------
    def start(self, name: str) -> None:
        with self._lock:
            self._live[name] = {}

    def add(self, key: bytes, e: Entry) -> None:
        with self._lock:
            self._live[e.pack][key] = e
            self._entries[key] = e

    def publish(self, name: str, *, durable: bool = False) -> None:
        """Write the index of the live pack `name` (temp file + rename; `durable`: the index is
        fsynced before the rename and the directory after it, else the caller syncs). Its
        entries stay live until the index is in place, so no read in between misses them."""
        with self._lock:
            entries = dict(self._live[name])
        body = json.dumps({"version": 1, "blocks": [[k.hex(), e.offset, e.length] for k, e in entries.items()]})
        tmp = self.dir / f".tmp-{name}.idx"
        with open(tmp, "w") as f:
            f.write(body)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{name}.idx")
        if durable:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # the pack's name and the index's
            finally:
                os.close(fd)
        with self._lock:
            del self._live[name]

    def abandon(self, name: str) -> None:
        """A batch that failed: its pack is removed (its blocks were never published)."""
        with self._lock:
            entries = self._live.pop(name, {})
            for k in entries:
                if self._entries.get(k) == entries[k]:
                    del self._entries[k]
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.dir / f"{name}.pack")
        except FileNotFoundError:
            pass

    # -- removing (delete, gc) -----------------------------------------------------------
    def remove(self, keys: set[bytes]) -> dict[str, dict[bytes, Entry]]:
        """Drop `keys` from every published index. Returns, per pack that lost blocks, what it
        keeps, for the caller to move out (then `drop_pack`) or leave."""
        self.refresh(force=True)
        touched: dict[str, dict[bytes, Entry]] = {}
        try:
            names = sorted(n[:-4] for n in os.listdir(self.dir) if n.endswith(".idx"))
        except FileNotFoundError:
            return {}
        for name in names:
            if name in self._live:
                continue
            entries = self._load(name)
            if not keys.intersection(entries):
                continue
            keep = {k: e for k, e in entries.items() if k not in keys}
            touched[name] = keep
            body = json.dumps({"version": 1, "blocks": [[k.hex(), e.offset, e.length] for k, e in keep.items()]})
            tmp = self.dir / f".tmp-{name}.idx"
            tmp.write_text(body)
            os.replace(tmp, self.dir / f"{name}.idx")
        self.refresh(force=True)
        return touched

    def drop_pack(self, name: str) -> None:
        """Remove a pack and its index (its blocks were moved out or are all deleted)."""
        with self._lock:
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        for suffix in (".idx", ".pack"):
            try:
                os.unlink(self.dir / f"{name}{suffix}")
            except FileNotFoundError:
                pass
        self.refresh(force=True)

    def pack_size(self, name: str) -> int:
        try:
            return os.stat(self.dir / f"{name}.pack").st_size
        except FileNotFoundError:
            return 0

    def remove_orphans(self) -> int:
        """Remove packs with no index that no writer holds (a crash mid-batch); return how many."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        removed = 0
        for n in names:
            if not n.endswith(".pack") or f"{n[:-5]}.idx" in names or n[:-5] in self._live:
                continue
            try:
                fd = os.open(self.dir / n, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a writer in another process is still filling it
            try:
                if not (self.dir / f"{n[:-5]}.idx").exists():
                    os.unlink(self.dir / n)
                    removed += 1
            finally:
                os.close(fd)
        return removed

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
