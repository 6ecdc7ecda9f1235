"""The embedded block store: a directory laid out like Kubo's flatfs, the default store.

Blocks are keyed by multihash (as Kubo's are, so a CIDv0 and a CIDv1 of the same bytes share
one file) under `blocks/<next-to-last two chars>/<BASE32 KEY>.data`, with a `SHARDING` file
naming the scheme. Writes are atomic (temp file, fsync, rename), every read is verified
against the CID asked for, a damaged copy is replaced by the next `put` of good bytes, and pins
(recursive, by root) survive `gc`. The pin set is read, changed and written under an exclusive
`flock` on `pins.lock`, so processes sharing a store (the CLI, `bootstrap serve`, an agent)
neither lose each other's pins nor collect blocks a pin being added protects.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cidboot.errors import FormatError, NotFoundError
from cidboot.ipld import dag
from cidboot.ipld.cid import CID, RAW
from cidboot.ipld.multihash import Multihash

SHARDING = "/repo/flatfs/shard/v1/next-to-last/2"
MAX_BLOCK = 4 * 1024 * 1024


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


def check_block(cid: CID, data: bytes) -> None:
    """What every way into a store checks first, before anything is written or queued: the
    size bound (BlockstoreError) and the hash (CIDMismatch). Nothing unverified is stored."""
    if len(data) > MAX_BLOCK:
        raise BlockstoreError(f"block {cid} is {len(data)} bytes, above the {MAX_BLOCK}-byte limit")
    cid.verify(data)


class _Puts:
    """What the file store and the memory store share: `put_block` on top of each one's `put`
    (through `put`, so a subclass's bookkeeping there, e.g. CachingStore's, sees it too)."""

    def put(self, cid: CID, data: bytes) -> None:
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
        self._batch: BatchWriter | None = None  # set while inside writer(): puts are queued to it
        self.path = Path(path) if path is not None else default_store_path()
        self.blocks_dir = self.path / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        shard = self.blocks_dir / "SHARDING"
        if shard.exists():
            if shard.read_text().strip() != SHARDING:
                raise BlockstoreError(f"{shard}: unsupported sharding {shard.read_text().strip()!r}")
        else:
            self._atomic_write(shard, (SHARDING + "\n").encode())
        self._pins_file = self.path / "pins.json"
        self._pins_lock_file = self.path / "pins.lock"
        self._lock = threading.RLock()

    @contextmanager
    def deferred_sync(self) -> Iterator[None]:
        """Batch many puts: each write is still atomic (temp file + rename, so a crash leaves
        no partial block under its name), but durability comes from one sync at the end
        instead of an fsync per block. Verify-on-read catches anything a crash damaged."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred:
                os.sync()

    @contextmanager
    def writer(self, *, depth: int = 16) -> Iterator[BatchWriter]:
        """Batch many puts (a fetch, an import): while this is open, `put` (from any thread)
        hashes the block once, in the caller's thread, and queues it for a background thread
        that writes while the caller reads the next one. Queued blocks already count for `has`
        and `get` (read your writes). On leaving, the queue drains, the first write error (if
        any) is raised, and one sync makes the batch durable (deferred_sync). At most `depth`
        blocks wait in memory. Nested calls share the outer writer."""
        if self._batch is not None:
            yield self._batch
            return
        with self.deferred_sync():
            w = BatchWriter(self, depth)
            self._batch = w
            try:
                yield w
            finally:
                self._batch = None
                w.close()

    # -- paths and atomic writes --------------------------------------------------------
    def _file(self, cid: CID) -> Path:
        key = _key(cid.multihash)
        return self.blocks_dir / key[-3:-1] / f"{key}.data"

    def _atomic_write(self, path: Path, data: bytes, *, durable: bool = False) -> None:
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
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _write_block(self, path: Path, data: bytes, tmp: str) -> None:
        """Atomic write of one block (temp name given by the caller, O_EXCL, rename), no fsync:
        BatchWriter's path, whose durability is deferred_sync's one sync at the end."""
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        tmp_path = os.path.join(path.parent, tmp)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with memoryview(data) as view:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            os.close(fd)
            fd = -1
            os.replace(tmp_path, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            raise

    # -- blocks -------------------------------------------------------------------------
    def put(self, cid: CID, data: bytes) -> None:
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
        try:
            data = self._file(cid).read_bytes()
        except FileNotFoundError:
            raise BlockNotFound(f"block {cid} is not in the store {self.path}") from None
        cid.verify(data)
        return data

    def has(self, cid: CID) -> bool:
        batch = self._batch
        return cid.is_identity or (batch is not None and batch.queued(cid) is not None) or self._file(cid).exists()

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
            raise BlockNotFound(f"block {cid} is not in the store {self.path}") from None

    def delete(self, cid: CID) -> None:
        try:
            self._file(cid).unlink()
        except FileNotFoundError:
            pass

    def multihashes(self) -> Iterator[Multihash]:
        """Every stored block's multihash (the store does not remember codecs, like Kubo)."""
        for shard in sorted(self.blocks_dir.iterdir()):
            if not shard.is_dir():
                continue
            for f in sorted(shard.glob("*.data")):
                raw = base64.b32decode(f.stem + "=" * (-len(f.stem) % 8))
                yield Multihash.decode(raw)

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
            removed = 0
            for mh in list(self.multihashes()):
                if mh.encode() not in keep:
                    self.delete(CID(1, RAW, mh))
                    removed += 1
            return removed


class BatchWriter:
    """Blocks into a Blockstore at the speed of the disk, not of one fsync per block.

    `put` checks the size and the hash (CIDMismatch before anything is queued: nothing
    unverified reaches the store, and each block is hashed exactly once), then queues the write;
    one background thread writes each block atomically (temp file + rename, as `put` does, so a
    crash never leaves a partial block under its name). The queue holds at most `depth` blocks,
    so memory stays flat however large the batch. A write error stops the writer; the next `put`
    or `close` raises it. Unlike `Blockstore.put`, a block already present is written again
    rather than read back and compared: callers batch blocks they found missing or damaged."""

    def __init__(self, store: Blockstore, depth: int = 16) -> None:
        self.store = store
        self.blocks = 0
        self.bytes = 0
        self._queue: queue.Queue[tuple[bytes, Path, bytes] | None] = queue.Queue(maxsize=max(1, depth))
        self._pending: dict[bytes, bytes] = {}  # multihash -> bytes queued, not yet renamed into place
        self._pending_lock = threading.Lock()
        self._error: BaseException | None = None
        self._tmp = f".tmp-{os.getpid()}-{id(self):x}-"
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="blockstore-writer", daemon=True)
        self._thread.start()

    def put(self, cid: CID, data: bytes) -> None:
        """Verify `data` against `cid` (CIDMismatch, BlockstoreError above MAX_BLOCK) and queue it."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BlockstoreError("BatchWriter.put after close")
        check_block(cid, data)
        if cid.is_identity:
            return
        key = cid.multihash.encode()
        with self._pending_lock:
            self._pending[key] = data
        self.blocks += 1
        self.bytes += len(data)
        self._queue.put((key, self.store._file(cid), data))

    def queued(self, cid: CID) -> bytes | None:
        """The bytes of `cid` if queued and not yet written (verified on put)."""
        with self._pending_lock:
            return self._pending.get(cid.multihash.encode())

    def _run(self) -> None:
        n = 0
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, path, data = item
            if self._error is None:  # after an error: drain, so a blocked put() wakes up and sees it
                n += 1
                try:
                    self.store._write_block(path, data, f"{self._tmp}{n}")
                except BaseException as e:  # handed to the caller's thread
                    self._error = e
            with self._pending_lock:
                if self._pending.get(key) is data:
                    del self._pending[key]

    def close(self) -> None:
        """Wait for every queued write; raise the first write error."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


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

    def put(self, cid: CID, data: bytes) -> None:
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
    def writer(self, *, depth: int = 16) -> Iterator[MemoryBlockstore]:
        """Batching is moot in memory: the store is its own writer (`put` verifies, stores)."""
        yield self

    @contextmanager
    def deferred_sync(self) -> Iterator[None]:
        yield


#: what the gateway client fetches into and the exporter reads from
AnyStore = Blockstore | MemoryBlockstore
