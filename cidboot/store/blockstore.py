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
import tempfile
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


class Blockstore:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._dirs: set[Path] = set()  # shard directories known to exist
        self._deferred = 0  # >0 while inside deferred_sync(): fsync once at the end instead
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

    # -- paths and atomic writes --------------------------------------------------------
    def _file(self, cid: CID) -> Path:
        key = _key(cid.multihash)
        return self.blocks_dir / key[-3:-1] / f"{key}.data"

    def _atomic_write(self, path: Path, data: bytes, *, durable: bool = False) -> None:
        """Temp file + rename; fsynced unless inside deferred_sync() (always when `durable`)."""
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
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

    # -- blocks -------------------------------------------------------------------------
    def put(self, cid: CID, data: bytes) -> None:
        """Store `data` under `cid` after checking it hashes to it (CIDMismatch otherwise)."""
        if len(data) > MAX_BLOCK:
            raise BlockstoreError(f"block {cid} is {len(data)} bytes, above the {MAX_BLOCK}-byte limit")
        cid.verify(data)
        if cid.is_identity:
            return
        path = self._file(cid)
        try:
            if path.read_bytes() == data:
                return  # already there, intact
        except FileNotFoundError:
            pass
        self._atomic_write(path, data)  # absent, or a damaged copy that reads would refuse: replace it

    def put_block(self, data: bytes, codec: int = RAW, version: int = 1) -> CID:
        cid = CID.of(data, codec, version)
        self.put(cid, data)
        return cid

    def get(self, cid: CID) -> bytes:
        """The block's bytes, verified against `cid` (corruption raises CIDMismatch)."""
        if cid.is_identity:
            return cid.multihash.digest
        try:
            data = self._file(cid).read_bytes()
        except FileNotFoundError:
            raise BlockNotFound(f"block {cid} is not in the store {self.path}") from None
        cid.verify(data)
        return data

    def has(self, cid: CID) -> bool:
        return cid.is_identity or self._file(cid).exists()

    def size(self, cid: CID) -> int:
        if cid.is_identity:
            return len(cid.multihash.digest)
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
