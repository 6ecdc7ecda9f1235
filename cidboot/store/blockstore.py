"""The embedded block store: a directory laid out like Kubo's flatfs, the default store.

Blocks are keyed by multihash (as Kubo's are, so a CIDv0 and a CIDv1 of the same bytes share
one file) under `blocks/<next-to-last two chars>/<BASE32 KEY>.data`, with a `SHARDING` file
naming the scheme. Every way in hashes a block before anything is written (nothing unverified
is ever stored), every read is verified against the CID asked for (a damaged or torn file is
refused, never served), a damaged copy is replaced by the next `put` of good bytes, and pins
(recursive, by root) survive `gc`. A single `put` is atomic and durable (temp file, fsync,
rename); a batch (`writer()`: a fetch, an import) writes its first blocks straight to their names and
appends the rest to one pack file beside flatfs (`cidboot.store.packs`), and makes the whole
batch durable at the end with an fsync of each file it wrote: see `BatchWriter` for why that
is safe. The
pin set is read, changed and written under an exclusive `flock` on `pins.lock`, so processes
sharing a store (the CLI, `bootstrap serve`, an agent) neither lose each other's pins nor
collect blocks a pin being added protects.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cidboot.errors import FormatError, NotFoundError
from cidboot.ipld import dag
from cidboot.ipld.cid import CID, RAW, CIDMismatch
from cidboot.ipld.multihash import Multihash
from cidboot.store.packs import FLATFS_FIRST, Entry, PackIndex, read_into_buffer

SHARDING = "/repo/flatfs/shard/v1/next-to-last/2"
MAX_BLOCK = 4 * 1024 * 1024
#: what `put` takes: a block's bytes, or a view of a buffer the caller reuses once `put` returns
#: (no store keeps a reference to such a buffer: the memory store copies it, a batch writer copies
#: it when queued unless it lent the buffer itself, `BatchWriter.buffer`)
Buffer = bytes | bytearray | memoryview


class BlockstoreError(FormatError):
    """The store directory is not a cidboot/flatfs store or is damaged."""


class BlockNotFound(NotFoundError):
    """The block asked for is not in the store."""


def default_store_path() -> Path:
    """`$CIDBOOT_STORE`, else `$XDG_DATA_HOME/cidboot/store` (~/.local/share/cidboot/store)."""
    env = os.environ.get("CIDBOOT_STORE")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "cidboot" / "store"


def _key(mh: Multihash) -> str:
    return base64.b32encode(mh.encode()).decode().rstrip("=")


def syncfs(path: str | os.PathLike[str]) -> None:
    """Make everything written to the file system holding `path` durable, and report a write
    error the kernel saw (Linux >= 5.8), unlike `os.sync`, which syncs every file system on the
    machine and reports nothing. Falls back to `os.sync` where libc has no syncfs."""
    try:
        import ctypes  # not at import: only a batch that wrote files gets here

        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def check_block(cid: CID, data: Buffer) -> None:
    """What every way into a store checks first, before anything is written or queued: the
    size bound (BlockstoreError) and the hash (CIDMismatch). Nothing unverified is stored."""
    if len(data) > MAX_BLOCK:
        raise BlockstoreError(f"block {cid} is {len(data)} bytes, above the {MAX_BLOCK}-byte limit")
    cid.verify(data)


class _Puts:
    """What the file store and the memory store share: `put_block` on top of each one's `put`
    (through `put`, so a subclass's bookkeeping there, e.g. CachingStore's, sees it too)."""

    def put(self, cid: CID, data: Buffer) -> None:
        raise NotImplementedError

    def put_block(self, data: bytes, codec: int = RAW, version: int = 1) -> CID:
        """Store `data` under its CID (`codec`, CID `version`, SHA-256) and return the CID."""
        cid = CID.of(data, codec, version)
        self.put(cid, data)
        return cid


class Blockstore(_Puts):
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._dirs: set[Path] = set()  # shard directories known to exist
        self._deferred = 0  # >0 while inside deferred_sync(): fsync once at the end instead
        self._unsynced = False  # a write skipped its fsync (deferred): the end of the batch syncs the file system
        self._batch: BatchWriter | None = None  # set while inside writer(): puts are queued to it
        self.path = Path(path) if path is not None else default_store_path()
        self.blocks_dir = self.path / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._blocks_str = str(self.blocks_dir)
        shard = self.blocks_dir / "SHARDING"
        if shard.exists():
            if shard.read_text().strip() != SHARDING:
                raise BlockstoreError(f"{shard}: unsupported sharding {shard.read_text().strip()!r}")
        else:
            self._atomic_write(shard, (SHARDING + "\n").encode())
        self._pins_file = self.path / "pins.json"
        self._pins_lock_file = self.path / "pins.lock"
        self._lock = threading.RLock()
        self.packs = PackIndex(self.path / "packs")  # a large batch's blocks (see cidboot.store.packs)

    @contextmanager
    def deferred_sync(self) -> Iterator[None]:
        """Batch many puts: each `put` is still atomic (temp file + rename), but durability
        comes from one `syncfs` of the store's file system at the end instead of an fsync per
        block. Verify-on-read catches anything a crash damaged before that sync."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred:
                self._unsynced = False
                syncfs(self.blocks_dir)

    @contextmanager
    def writer(self, *, depth: int = 16, skip_present: bool = False) -> Iterator[BatchWriter]:
        """Batch many puts (a fetch, an import): while this is open, `put` (from any thread) hashes the
        block once, in the caller's thread, and queues it for a `BatchWriter` thread that writes
        while the caller reads the next one (first blocks to flatfs files, the rest to one pack).
        Queued blocks already count for `has` and `get` (read your writes). On leaving, the queue
        drains, the pack's index is written, the first write error (if any) is raised, and the
        files the batch wrote are made durable, each by its own fsync (`BatchWriter.close`), not
        by a sync of the whole file system, which would also wait for whatever other programs
        left dirty on it. At most about 1.5 x `depth` blocks wait in memory.

        `skip_present`: for a producer that does not know what the store holds (an import, a
        build, a CAR file), where a fetch knows what it is missing. A block the store already
        holds intact, or that this batch already took, is not written again; and since the
        producer cannot say how many new blocks will come (the fetch's `expect_many`), the batch
        counts them: the first FLATFS_FIRST new blocks are held until one more arrives (then
        they all go to the pack) or the batch ends (then they go to flatfs files), so a new
        large file lands in one pack and a small change to a stored one in a few flatfs files
        (`BatchWriter.put`; up to FLATFS_FIRST + 1 blocks held, whatever `depth`). Nested calls share the outer writer (`skip_present` applies to it
        while the inner one is open; the outer one's way of choosing flatfs or pack stays)."""
        if skip_present:
            self.packs.refresh()  # what `_holds` looks in for the whole batch
        outer = self._batch
        if outer is not None:
            was = outer.skip_present
            outer.skip_present = was or skip_present
            try:
                yield outer
            finally:
                outer.skip_present = was
            return
        self._deferred += 1
        w = BatchWriter(self, depth)
        if skip_present:
            w.skip_present = w._holding = True
        self._batch = w
        try:
            yield w
        finally:
            self._batch = None
            self._deferred -= 1
            try:
                w.close()
            finally:
                if not self._deferred and self._unsynced:  # something not the batch's
                    self._unsynced = False  # own files was written without its fsync meanwhile
                    syncfs(self.blocks_dir)

    # -- paths and atomic writes --------------------------------------------------------
    def _file(self, cid: CID) -> Path:
        key = _key(cid.multihash)
        return self.blocks_dir / key[-3:-1] / f"{key}.data"

    def _atomic_write(self, path: Path, data: Buffer, *, durable: bool = False) -> None:
        """Temp file + rename; fsynced unless inside deferred_sync() (always when `durable`)."""
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        import tempfile  # not at import: a boot stage that keeps blocks in memory never writes files

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable or not self._deferred:
                    f.flush()
                    os.fsync(f.fileno())
                else:
                    self._unsynced = True
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _block_path(self, mh: bytes) -> str:
        """`_file` of the encoded multihash `mh`, as a string, without pathlib (the batch
        writer's per-block path)."""
        key = base64.b32encode(mh).decode().rstrip("=")
        return f"{self._blocks_str}/{key[-3:-1]}/{key}.data"

    def _write_new(self, path: str, data: Buffer) -> None:
        """One block the caller verified, straight to its final name: create (O_EXCL), write,
        close; no temp name, no rename, no fsync (BatchWriter's path: the batch fsyncs it when
        it ends). Until the write completes, or if a crash cuts it, the file under the
        name is short or empty, and every read refuses it (it does not hash to its CID): it
        counts as absent-and-damaged, and the next put or fetch of the block replaces it. A
        file already there (a damaged copy the caller is replacing, or another process's
        write) is replaced atomically instead (temp file + rename), never written into."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # a new shard directory
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            self._atomic_write(Path(path), data)
            return
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            try:  # do not leave a torn file behind when we know it is one (reads would refuse it anyway)
                os.unlink(path)
            except OSError:
                pass
            raise
        os.close(fd)

    def _holds(self, key: bytes, data: Buffer) -> bool:
        """Whether the store holds an intact copy of the block `data` (multihash `key`): its
        flatfs file, or else its pack entry, has exactly these bytes (compared, as `put`
        compares, rather than hashed again: `data` was verified by the caller). Packs as last
        loaded (`PackIndex.known`): one another process published since is missed, and the
        block is written again, which costs space, never correctness."""
        try:
            fd = os.open(self._block_path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                if os.fstat(fd).st_size == len(data) and os.pread(fd, len(data) + 1, 0) == data:
                    return True
            finally:
                os.close(fd)
        entry = self.packs.known(key)  # as loaded when the batch began (`writer`): no listing per block
        return entry is not None and entry.length == len(data) and self.packs.read(entry) == data

    # -- blocks -------------------------------------------------------------------------
    def put(self, cid: CID, data: Buffer) -> None:
        """Store `data` under `cid` after checking it hashes to it (CIDMismatch otherwise).
        Inside writer(), the write is queued to the batch (see there)."""
        batch = self._batch
        if batch is not None:
            batch.put(cid, data)
            return
        check_block(cid, data)
        if cid.is_identity:
            return
        path = self._file(cid)
        try:
            if path.read_bytes() == data:
                return  # already there, intact
        except FileNotFoundError:
            pass
        self._atomic_write(path, data)  # absent, or a damaged copy that reads would refuse: replace it

    def get(self, cid: CID) -> bytes:
        """The block's bytes, verified against `cid` (corruption raises CIDMismatch)."""
        if cid.is_identity:
            return cid.multihash.digest
        batch = self._batch
        if batch is not None:
            queued = batch.queued(cid)
            if queued is not None:
                return queued  # verified by put a moment ago, still in this process's memory
        damaged: CIDMismatch | None = None
        try:
            data = self._file(cid).read_bytes()
        except FileNotFoundError:
            pass
        else:
            try:
                cid.verify(data)
                return data
            except CIDMismatch as e:  # a pack may hold a good copy (a fetch that replaced it)
                damaged = e
        entry = self.packs.lookup(cid.multihash.encode())
        data_or_none = self.packs.read(entry) if entry is not None else None
        if data_or_none is None:
            if entry is not None and damaged is None:  # the pack went (gc in another process moved
                self.packs.refresh(force=True)  # its survivors to flatfs): look once more
                try:
                    data = self._file(cid).read_bytes()
                    cid.verify(data)
                    return data
                except FileNotFoundError:
                    pass
            if damaged is not None:
                raise damaged
            raise BlockNotFound(f"block {cid} is not in the store {self.path}") from None
        cid.verify(data_or_none)
        return data_or_none

    def get_into(self, cid: CID, buf: bytearray) -> memoryview:
        """`get`, read into `buf` instead of a new bytes object: a view of the verified block,
        in `buf` or, when the block does not fit, in a new larger bytearray (the view's `obj`,
        for a caller that reuses its buffers). The bytes are hashed after the read, in the
        buffer they are returned in, so what the view shows is what was verified for as long
        as the caller does not write into `buf`. For a reader that sends each block before it
        reads another into the same buffer (the gateway's CAR stream): no allocation and no
        fresh pages per block. Anything but an intact block in its file or pack (absent,
        damaged, a pack gone) goes through `get`, with its errors."""
        if cid.is_identity:
            return memoryview(cid.multihash.digest)
        key = cid.multihash.encode()
        try:
            fd = os.open(self._block_path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            entry = self.packs.lookup(key)
            view = self.packs.read_into(entry, buf) if entry is not None else None
        else:
            try:
                view = read_into_buffer(fd, buf, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        if view is not None and cid.multihash.matches(view):
            return view
        return memoryview(self.get(cid))

    def has(self, cid: CID) -> bool:
        batch = self._batch
        return (cid.is_identity or (batch is not None and batch.queued(cid) is not None) or self._file(cid).exists()
                or self.packs.lookup(cid.multihash.encode()) is not None)

    def size(self, cid: CID) -> int:
        if cid.is_identity:
            return len(cid.multihash.digest)
        batch = self._batch
        queued = batch.queued(cid) if batch is not None else None
        if queued is not None:
            return len(queued)
        try:
            return self._file(cid).stat().st_size
        except FileNotFoundError:
            entry = self.packs.lookup(cid.multihash.encode())
            if entry is not None:
                return entry.length
            raise BlockNotFound(f"block {cid} is not in the store {self.path}") from None

    def delete(self, cid: CID) -> None:
        self._delete({cid.multihash.encode()})

    def _delete(self, keys: set[bytes]) -> None:
        """Remove the blocks `keys` (encoded multihashes) from flatfs and from the packs. A pack
        left with less than half its bytes live has them moved to flatfs files and is removed."""
        for key in keys:
            try:
                os.unlink(self._block_path(key))
            except FileNotFoundError:
                pass
        in_packs = {k for k in keys if self.packs.lookup(k) is not None}  # most deletes touch no pack
        for name, keep in (self.packs.remove(in_packs) if in_packs else {}).items():
            if sum(e.length for e in keep.values()) * 2 >= self.packs.pack_size(name):
                continue
            with self.deferred_sync():
                for key, e in keep.items():
                    data = self.packs.read(e)
                    if data is not None and Multihash.decode(key).matches(data):  # a damaged copy is dropped
                        self._atomic_write(Path(self._block_path(key)), data)
            self.packs.drop_pack(name)

    def multihashes(self) -> Iterator[Multihash]:
        """Every stored block's multihash (the store does not remember codecs, like Kubo)."""
        seen: set[bytes] = set()
        for shard in sorted(self.blocks_dir.iterdir()):
            if not shard.is_dir():
                continue
            for f in sorted(shard.glob("*.data")):
                raw = base64.b32decode(f.stem + "=" * (-len(f.stem) % 8))
                seen.add(raw)
                yield Multihash.decode(raw)
        for key in sorted(self.packs.keys()):
            if key not in seen:
                yield Multihash.decode(key)

    # -- pins and gc --------------------------------------------------------------------
    def pins(self) -> list[CID]:
        try:
            return [CID.parse(s) for s in json.loads(self._pins_file.read_text())]
        except FileNotFoundError:
            return []
        except (ValueError, FormatError) as e:
            raise BlockstoreError(f"{self._pins_file}: damaged pin list: {e}") from None

    def _save_pins(self, pins: list[CID]) -> None:
        body = json.dumps(sorted({str(p) for p in pins}), indent=1) + "\n"
        self._atomic_write(self._pins_file, body.encode(), durable=True)

    @contextmanager
    def _pins_locked(self) -> Iterator[None]:
        """Exclusive hold on the pin set, against other threads (RLock) and other processes
        (flock on pins.lock): every read-modify-write of pins.json, and gc, runs inside it."""
        with self._lock:
            fd = os.open(self._pins_lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def pin(self, root: CID) -> None:
        """Pin `root` recursively; every block under it must be present."""
        with self._pins_locked():  # gc cannot run between the check and the pin
            for _ in dag.walk(root, self.get):
                pass
            self._save_pins([*self.pins(), root])

    def unpin(self, root: CID) -> None:
        with self._pins_locked():
            pins = self.pins()
            if root not in pins:
                raise NotFoundError(f"{root} is not pinned")
            self._save_pins([p for p in pins if p != root])

    def gc(self) -> int:
        """Delete every block not reachable from a pin; return how many were removed."""
        with self._pins_locked():
            keep: set[bytes] = set()
            for root in self.pins():
                for cid, _ in dag.walk(root, self.get):
                    keep.add(cid.multihash.encode())
            doomed = {mh.encode() for mh in self.multihashes()} - keep
            self._delete(doomed)
            self.packs.remove_orphans()
            return len(doomed)


#: a batch's pack is handed to the disk in steps of this many bytes while it is written, so the
#: batch's closing sync waits for the last step, not for the whole batch
WRITEBACK_STEP = 8 * 1024 * 1024
#: blocks handed to the writer's thread together (and written to the pack with one write): at most
#: this many, of at most WRITE_GATHER bytes together
GROUP = 8
WRITE_GATHER = 2 * 1024 * 1024
_sync_file_range: Any = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes at `offset` of `fd` to the disk, without waiting
    (sync_file_range(SYNC_FILE_RANGE_WRITE)); a no-op where libc lacks it. Not a durability
    point: only the batch's fsyncs are."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; an error shows at the sync


#: one queued write: the block's multihash, its bytes, the lent buffer they are in (or None)
_Item = tuple[bytes, Buffer, "bytearray | None"]


class BatchWriter:
    """Blocks into a Blockstore at the speed of the disk, not of one fsync (or one file) per block.

    `put` checks the size and the hash (CIDMismatch before anything is queued: nothing
    unverified reaches the store, and each block is hashed exactly once), then queues the write;
    one background thread writes while the caller reads and hashes the next block, in groups
    (one wake-up and one write per group). The first `FLATFS_FIRST` blocks go to flatfs files, straight to their
    names (one create, one write, one close: `Blockstore._write_new`), so a small batch (a
    manifest, a flow) makes no pack; every later block is appended to one pack file
    (`cidboot.store.packs`), whose index is written when the batch ends. Then `close` fsyncs what the batch wrote.

    Buffers: a caller that reads blocks into memory of its own (the fetch client's CAR reader)
    takes it from `buffer(size)` and puts a view of it: the writer owns that buffer until the
    block is written, then hands it out again, so a fetch neither allocates nor copies per block
    (at most about 1.5 x `depth` + a few buffers exist: a group being filled, one queued, one
    being written). Any other buffer is copied when queued (bytes are
    queued as they are): once `put` returns, the caller may reuse what it passed.

    Why no temp file and rename per block, and an index written before the sync: they would buy
    "a crash never leaves a partial block under its name", but the store never trusts a name
    or an index anyway. Every read hashes the block against the CID asked for, so a short,
    empty or torn file, or an index entry whose bytes a crash kept off the disk, is refused as
    damaged, never served, and the next put or fetch replaces it. What a crash mid-batch
    leaves, then: some blocks whole, some absent, some torn (refused on read, fetched again),
    perhaps a pack with no index (invisible; `gc` removes it); nothing that reads as a wrong
    block. The durability point is the fsyncs at the end of the batch: a fetch that returned
    has every block on disk, and only then may a caller pin the root.

    The queue holds one group, so memory stays flat however large the batch. Queued
    blocks already count for `has` and `get` (read your writes). A write error stops the writer
    (its pack is removed, unpublished); the next `put` or `close` raises it. Unlike
    `Blockstore.put`, a block already present is not read back and compared: callers batch
    blocks they found missing or damaged (a good copy in a pack wins over a damaged flatfs file
    on read, and a file found at the name is replaced atomically)."""

    def __init__(self, store: Blockstore, depth: int = 16) -> None:
        import queue
        from collections import deque

        self.store = store
        self.blocks = 0
        self.bytes = 0
        self.depth = max(1, depth)
        # blocks go to the writer's thread in groups: one wake-up, and one write to the pack, per
        # group rather than per block (a thread switch per 256 KiB block was ~10 % of a fetch's CPU)
        self._group_max = max(1, min(GROUP, self.depth // 2))
        self._group: list[_Item] = []
        self._group_bytes = 0
        self._queue: queue.Queue[list[_Item] | None] = queue.Queue(maxsize=max(1, self.depth // self._group_max - 1))
        self._pending: dict[bytes, Buffer] = {}  # multihash -> bytes queued, not yet written
        self._pending_lock = threading.Lock()
        self._free: deque[bytearray] = deque()  # buffers written out, to hand out again
        self._lent: dict[int, bytearray] = {}  # id -> buffer handed out by `buffer`, not yet put
        self._flatfs_first = FLATFS_FIRST  # blocks to flatfs files before the pack (0 after `expect_many`)
        #: an import's batch (`Blockstore.writer(skip_present=True)`): `put` skips what the store
        #: holds intact or this batch took already (`_taken`)
        self.skip_present = False
        self._taken: set[bytes] = set()
        #: an import's batch: new blocks are held in `_group` until there are more than
        #: FLATFS_FIRST (then all to the pack) or the batch ends (flatfs files)
        self._holding = False
        self.skipped = 0  # puts skip_present found already stored or taken
        self._files: list[str] = []  # flatfs files this batch created: fsynced before it closes
        self._syncer: threading.Thread | None = None  # fsyncs them while the pack is written
        self._sync_error: OSError | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._written = 0
        self._pack: str | None = None  # this batch's pack, once it has one
        self._pack_fd = -1
        self._pack_size = 0  # bytes in the pack so far
        self._flushed = 0  # pack bytes handed to the disk so far (early writeback)
        self._thread = threading.Thread(target=self._run, name="blockstore-writer", daemon=True)
        self._thread.start()

    def buffer(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes to read a block into and `put` a view of (see the
        class): one the writer has finished with, or a new one."""
        try:
            buf = self._free.pop()
        except IndexError:
            buf = bytearray(size)
        if len(buf) < size:
            buf = bytearray(size)
        if len(self._lent) > self.depth + 4:  # handed out and never put (a block sent twice): forget them;
            self._lent.clear()  # one put after all is copied, as any buffer not ours
        self._lent[id(buf)] = buf
        return buf

    def expect_many(self) -> None:
        """The caller knows this batch will pass FLATFS_FIRST blocks (a CAR whose blocks so far
        link to more): the blocks not yet written go straight to the pack. Flatfs files are
        for batches too small to make a pack; each one costs its own fsync (and its
        directory's) when the batch ends."""
        self._flatfs_first = 0
        self._holding = False

    def put(self, cid: CID, data: Buffer, key: bytes | None = None) -> None:
        """Verify `data` against `cid` (CIDMismatch, BlockstoreError above MAX_BLOCK) and queue it.
        `key`: the CID's encoded multihash, when the caller has it already (the fetch client).
        With `skip_present` (an import), a block this batch already took (a file's repeated
        chunk) or that the store holds intact (`Blockstore._holds`: a file imported again) is
        not queued, as a lone `Blockstore.put` writes nothing for it; a damaged copy is
        replaced (a new copy: a flatfs file atomically, or the pack's, which reads prefer).
        The first FLATFS_FIRST blocks it does queue are held here (read-your-writes already)
        until the next one decides for the pack, or `close` sends them to flatfs files."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BlockstoreError("BatchWriter.put after close")
        check_block(cid, data)
        if cid.is_identity:
            return
        if self.skip_present:
            if key is None:
                key = cid.multihash.encode()
            if key in self._taken or self.store._holds(key, data):
                self.skipped += 1
                self._taken.add(key)
                return
            self._taken.add(key)
        owned: bytearray | None = None
        if isinstance(data, memoryview):
            owned = self._lent.pop(id(data.obj), None)
            if owned is None or owned is not data.obj:  # not a buffer we lent: copied
                owned, data = None, bytes(data)  # (else ours until written: queued as it is)
        elif not isinstance(data, bytes):
            data = bytes(data)  # a buffer the caller may reuse once put returns
        if key is None:
            key = cid.multihash.encode()
        with self._pending_lock:
            self._pending[key] = data
        self.blocks += 1
        self.bytes += len(data)
        self._group.append((key, data, owned))
        self._group_bytes += len(data)
        if self._holding:  # an import's first new blocks: flatfs files or the pack, not known yet
            if len(self._group) <= FLATFS_FIRST:
                return
            self.expect_many()  # one more than flatfs takes: all to the pack, in groups as ever
            held, self._group, self._group_bytes = self._group, [], 0
            for i in range(0, len(held), self._group_max):
                self._queue.put(held[i : i + self._group_max])
            return
        if len(self._group) >= self._group_max or self._group_bytes >= WRITE_GATHER:
            self._hand_over()

    def queued(self, cid: CID) -> bytes | None:
        """The bytes of `cid` if queued and not yet written (verified on put)."""
        with self._pending_lock:
            data = self._pending.get(cid.multihash.encode())
            return None if data is None else bytes(data)

    def _open_pack(self) -> None:
        """Create this batch's pack (locked against gc)."""
        import time

        packs = self.store.packs
        packs.dir.mkdir(exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{id(self):x}"
        path = packs.dir / f"{name}.pack"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # gc leaves a pack without an index alone while this is held
        self._pack, self._pack_fd = name, fd
        packs.start(name)

    def _append(self, items: list[_Item]) -> None:
        """Append blocks to this batch's pack (created on first use) and release them (indexed,
        no longer pending, their buffers free) once their bytes are in the file: one gathering
        write of the blocks as they are."""
        if self._pack is None:
            self._open_pack()
        pack = self._pack
        assert pack is not None
        offset = self._pack_size
        entries = []
        for key, data, _ in items:
            entries.append((key, Entry(pack, offset, len(data))))
            offset += len(data)
        self._write([memoryview(data) for _, data, _ in items], self._pack_size)
        for key, e in entries:
            self.store.packs.add(key, e)
        self._pack_size = offset
        self._done(items)
        if self._pack_size - self._flushed >= WRITEBACK_STEP:
            _start_writeback(self._pack_fd, self._flushed, self._pack_size - self._flushed)
            self._flushed = self._pack_size

    def _write(self, views: list[memoryview], offset: int) -> None:
        """pwritev until every byte of `views` is at `offset` of the pack."""
        views = [v for v in views if len(v)]
        while views:
            n = os.pwritev(self._pack_fd, views, offset)
            offset += n
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0

    def _run(self) -> None:
        store = self.store
        while True:
            items = self._queue.get()
            if items is None:
                return
            if self._error is None:  # after an error: drain, so a blocked put() wakes up and sees it
                try:
                    while items and self._written < self._flatfs_first:  # a small batch's blocks: files
                        key, data, _ = items[0]
                        path = store._block_path(key)
                        store._write_new(path, data)
                        self._files.append(path)
                        self._written += 1
                        self._done([items.pop(0)])
                    if items:
                        if self._pack is None and self._files:  # the files are all written: their
                            self._syncer = threading.Thread(target=self._sync_files, name="blockstore-fsync",
                                                            daemon=True)  # fsyncs overlap the rest
                            self._syncer.start()
                        n = len(items)
                        self._append(items)  # the rest: to the pack, released as written
                        self._written += n
                        items = []
                except BaseException as e:  # handed to the caller's thread
                    self._error = e
            if items:  # dropped after an error: no longer pending (their buffers are not reused)
                self._unpend(items)

    def _unpend(self, items: list[_Item]) -> None:
        """Blocks no longer pending (unless a later put queued the same block again)."""
        with self._pending_lock:
            for key, data, _ in items:
                if self._pending.get(key) is data:
                    del self._pending[key]

    def _done(self, items: list[_Item]) -> None:
        """Blocks written: no longer pending, their buffers free."""
        self._unpend(items)
        for _, _, owned in items:
            if owned is not None:
                self._free.append(owned)  # written: it may be read into again

    def _hand_over(self) -> None:
        """Queue the blocks put since the last hand-over to the writer's thread, as one group."""
        group, self._group, self._group_bytes = self._group, [], 0
        if group:
            self._queue.put(group)

    def close(self) -> None:
        """Wait for every queued write, make the batch's files durable and publish the pack's
        index; raise the first write error."""
        if not self._closed:
            self._closed = True
            self._hand_over()
            self._queue.put(None)
            self._thread.join()
            if self._syncer is not None:  # started by the writer's thread, which has ended: joined
                self._syncer.join()  # once, here, on every path (an error included)
            self._free.clear()
            self._lent.clear()
            try:
                if self._error is None:
                    try:
                        self._sync()
                    except OSError as e:
                        self._error = e
                if self._pack is not None:
                    if self._error is None:
                        try:
                            self.store.packs.publish(self._pack, durable=True)
                        except OSError as e:
                            self._error = e
                    if self._error is not None:
                        self.store.packs.abandon(self._pack)
            finally:
                if self._pack_fd >= 0:
                    os.close(self._pack_fd)  # releases the lock
                    self._pack_fd = -1
        if self._error is not None:
            raise self._error

    def _sync(self) -> None:
        """fsync what this batch wrote, and only that: the pack (fdatasync: its data and size),
        each flatfs file, and the directories they were created in (so the names survive a
        crash too). The files were fsynced while the pack was being written when the batch got
        that far (`_syncer`, joined by `close`)."""
        if self._syncer is None:
            self._sync_files()
        if self._sync_error is not None:
            raise self._sync_error
        if self._pack is not None:
            os.fdatasync(self._pack_fd)
            _fsync_path(str(self.store.path))  # `packs` may be new (its own entries: PackIndex.publish)

    def _sync_files(self) -> None:
        """fsync the flatfs files this batch created and their directories (an error is kept
        for `close` to raise)."""
        dirs = {os.path.dirname(p) for p in self._files}
        if dirs:
            dirs.add(self.store._blocks_str)  # a shard directory may be new
        try:
            for path in (*self._files, *sorted(dirs)):
                _fsync_path(path)
        except OSError as e:
            self._sync_error = e


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: Buffer) -> None:
    """os.write until every byte of `data` is written (a short write is rare, not an error)."""
    done = os.write(fd, data)
    if done < len(data):
        with memoryview(data) as view:
            while done < len(view):
                done += os.write(fd, view[done:])


class MemoryBlockstore(_Puts):
    """Blocks in this process's memory, for a boot stage whose root file system is RAM anyway
    (the bootstrap): no files, no temp names, no sync. `put` verifies like Blockstore's; `get`
    does not hash again, since the only way in is `put` and nothing else can write to a dict
    in this process (verify-on-read guards files another process or the disk can change).
    The same reading surface as Blockstore (`get`, `has`, `put`, `put_block`, `size`,
    `delete`, `writer`), so the gateway client and the exporter take either."""

    def __init__(self) -> None:
        self._blocks: dict[bytes, bytes] = {}
        self.path = Path("<memory>")

    def put(self, cid: CID, data: Buffer) -> None:
        check_block(cid, data)
        if not cid.is_identity:
            self._blocks[cid.multihash.encode()] = bytes(data)

    def get(self, cid: CID) -> bytes:
        if cid.is_identity:
            return cid.multihash.digest
        try:
            return self._blocks[cid.multihash.encode()]
        except KeyError:
            raise BlockNotFound(f"block {cid} is not in memory") from None

    def has(self, cid: CID) -> bool:
        return cid.is_identity or cid.multihash.encode() in self._blocks

    def size(self, cid: CID) -> int:
        return len(self.get(cid))

    def delete(self, cid: CID) -> None:
        self._blocks.pop(cid.multihash.encode(), None)

    def clear(self) -> None:
        """Drop every block (a stage frees a layer's blocks once it holds the layer's bytes)."""
        self._blocks.clear()

    @contextmanager
    def writer(self, *, depth: int = 16, skip_present: bool = False) -> Iterator[MemoryBlockstore]:
        """Batching is moot in memory: the store is its own writer (`put` verifies, stores; a
        block stored twice is one dict entry, so `skip_present` holds anyway)."""
        yield self

    @contextmanager
    def deferred_sync(self) -> Iterator[None]:
        yield


#: what the gateway client fetches into and the exporter reads from
AnyStore = Blockstore | MemoryBlockstore
