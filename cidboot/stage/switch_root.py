"""Hand over to the next stage: without a new kernel when it runs on the kernel already running
(switch_root semantics), with kexec otherwise (docs/boot-chain.md, "Hand-offs"; ADR 0007).

The rule (`decide`): a stage hands over in the same kernel only when the SHA-512 of the next
stage's kernel bytes equals the SHA-512 its own image records in /etc/cidboot/kernel.sha512
(written by the image builder from the kernel layer it built the image with), and every kernel
parameter the next stage's command line asks for is already in effect (/proc/cmdline; `cidboot.*`
words are for the stages, not the kernel). That file is in
the stage's initrd, which is inside the stage's own measurement (code_hash_of_blobs([kernel,
initrd])), so a stage cannot claim to run a kernel its measurement does not show. No file, a
different hash, `cidboot.handover=kexec` on the kernel command line, or `"handover": "kexec"` in
the hand-off the stage received: kexec (cidboot.stage.kexec). A knob can only force the kexec
path, never the same-kernel one, so it needs no measurement.

The same-kernel path, in an order that touches nothing until the next stage's initramfs has
parsed completely (a malformed archive refuses with the old stage intact; a compression the
stage cannot read falls back to kexec, which lets the kernel read it):

1. decompress and parse the initramfs (concatenated newc archives, each uncompressed, gzip or
   xz, zero padding between them; as the kernel's unpacker reads them). When it begins with the
   running image's runtime layer (/etc/cidboot/runtime.json: its first `size` bytes have that
   `sha256`) and every path runtime.json lists is still in the running root, that segment is
   neither decompressed nor written: its files are kept (`Runtime`, `plan`; the caller may also
   say it never fetched the layer because it is the running one: `fetch_runtime`);
2. unload `qemu_fw_cfg` (delete_module(2)): the next stage must not reach the DICE engine's CDI_0;
3. delete the old root's files (not crossing mounts; frees the RAM, as switch_root(8) does) and
   unmount /proc, /sys, /dev and anything else mounted there;
4. mount a fresh tmpfs, `mount --move` it onto /, chroot into it, and unpack the archive there
   (after the chroot, so absolute symlinks in the archive resolve inside the new root). Keeping
   the runtime: no new tmpfs; step 3 deletes everything but the listed paths (also what the
   unmounted mount points hid) and the other segments are unpacked onto the same root;
5. write the hand-off (run/cidboot/boot.json, run/cidboot/dice.cbor 0600: the same files
   cidboot.stage.handoff appends as a cpio for kexec), wipe the caller's secrets and our copy;
6. close every fd above stderr and execve /init: PID 1 stays PID 1 and the old interpreter's
   memory goes with its address space.

Debug builds only: an image holding /etc/cidboot/handover-check (never in production images; it
is in the measured initrd, so such a build has its own code hash) adds `handover_check` probes
(SHA-256 and a 4-byte prefix of each secret the stage held) to boot.json, and the next stage
prints `cidboot: handover-check: ...` after searching its reachable files for them
(`report_handover_check`).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import hmac
import json
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cidboot.errors import CidbootError, FormatError
from cidboot.stage import syscalls
from cidboot.stage.console import say, wipe
from cidboot.stage.cpio import (
    MAGIC,
    TRAILER_NAME,
    ZSTD_MAGIC,
    CpioError,
    Member,
    ZstdFrameError,
    header_fields,
    normalize_path,
    zstd_frame_end,
)
from cidboot.stage.handoff import BOOT_PATH, DICE_PATH, Handoff, canonical_json

RUNNING_KERNEL = "/etc/cidboot/kernel.sha512"
RUNTIME_JSON = "etc/cidboot/runtime.json"  # the running image's runtime layer (imagebuilder writes it), under the root
CHECK_FLAG = "/etc/cidboot/handover-check"  # debug/test builds only
FORCE_ARG = "cidboot.handover=kexec"
NEW_ROOT = "/newroot"
INIT = "/init"
UNLOAD = ("qemu_fw_cfg",)  # what the next stage must not reach (the engine's CDI_0 on fw_cfg)
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
KNOWN_MAGICS = {b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\x89LZO": "lzo", b"\x02\x21\x4c\x18": "lz4",
                b"\x5d\x00\x00": "lzma"}


class SwitchRootError(CidbootError):
    """The same-kernel hand-over failed part way (the message names the step)."""


class InitramfsError(FormatError):
    """The next stage's initramfs is not a sequence of newc archives we can read (names the offset)."""


class UnsupportedCompression(InitramfsError):
    """A segment is compressed with something the stage cannot decompress: kexec instead."""


# -- the rule ---------------------------------------------------------------------------------


def running_kernel_sha512(path: str | os.PathLike[str] = RUNNING_KERNEL) -> bytes | None:
    """The SHA-512 of the kernel this image was built for (imagebuilder writes it), or None."""
    try:
        raw = Path(path).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        value = bytes.fromhex(raw)
    except ValueError:
        return None
    return value if len(value) == 64 else None


def kexec_forced(boot: dict[str, Any] | None = None, cmdline_path: str | os.PathLike[str] = "/proc/cmdline") -> bool:
    """True when the command line says `cidboot.handover=kexec` or the received hand-off says
    `"handover": "kexec"` (how a forced kexec reaches a stage that was itself kexec'ed)."""
    if boot is not None and boot.get("handover") == "kexec":
        return True
    try:
        return FORCE_ARG in Path(cmdline_path).read_text().split()
    except OSError:
        return False


def kernel_params(cmdline: str) -> set[str]:
    """The parameters a command line gives the kernel (`cidboot.*` ones are read by the stages)."""
    return {w for w in cmdline.split() if not w.startswith("cidboot.")}


def decide(kernel: bytes, *, running: bytes | None, forced: bool = False, cmdline: str = "",
           running_cmdline: str | None = "") -> str:
    """"switch_root" when `kernel` is byte-identical to the running one (by its SHA-512) and every
    kernel parameter the next stage asks for (`cmdline`) is already in effect (`running_cmdline`,
    /proc/cmdline): a running kernel cannot take new boot parameters. Else "kexec"."""
    if forced or running is None or running_cmdline is None:
        return "kexec"
    if not kernel_params(cmdline) <= kernel_params(running_cmdline):
        return "kexec"
    return "switch_root" if hmac.compare_digest(hashlib.sha512(kernel).digest(), running) else "kexec"


def proc_cmdline(path: str | os.PathLike[str] = "/proc/cmdline") -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


# -- the running runtime ----------------------------------------------------------------------


class RuntimeMissing(SwitchRootError):
    """The runtime layer was not fetched (it is the running one) and the running root cannot
    supply it: the caller must fetch it after all."""


class Runtime:
    """The running image's runtime layer, as /etc/cidboot/runtime.json (written by the image
    builder into the config layer, so inside this stage's measured initrd) describes it: the
    layer's CID, size and hashes of its compressed bytes, and every member path of its archive in
    archive order (`normalize_path`'s form). Every stage flow of an arch ships a byte-identical
    runtime layer, so the next stage's initramfs usually begins with exactly these bytes. A value
    (compared by its fields, never changed), written out rather than a frozen dataclass, whose
    generated methods cost the firmware and the bootstrap ~3 M guest instructions at import."""

    __slots__ = ("cid", "size", "sha256", "sha512", "paths")

    def __init__(self, cid: str, size: int, sha256: bytes, sha512: bytes, paths: tuple[str, ...]) -> None:
        self.cid = cid
        self.size = size
        self.sha256 = sha256
        self.sha512 = sha512
        self.paths = paths

    def _key(self) -> tuple[str, int, bytes, bytes, tuple[str, ...]]:
        return self.cid, self.size, self.sha256, self.sha512, self.paths

    def __eq__(self, other: object) -> bool:
        return type(other) is Runtime and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Runtime(cid={self.cid!r}, size={self.size}, paths=<{len(self.paths)}>)"

    def begins(self, initrd: bytes | memoryview) -> bool:
        """True when `initrd`'s first `size` bytes are this layer (the length first, then SHA-256)."""
        if self.size <= 0 or len(initrd) < self.size:
            return False
        return hmac.compare_digest(hashlib.sha256(memoryview(initrd)[:self.size]).digest(), self.sha256)

    def missing(self, root: str = "/") -> str | None:
        """The first listed path the running root lacks (None: all present). A root another stage
        pruned or a file deleted at run time cannot stand in for the layer."""
        for p in self.paths:
            if not os.path.lexists(os.path.join(root, p)):
                return p
        return None


def parse_runtime_json(raw: bytes) -> Runtime:
    """A runtime.json's bytes as a Runtime; ValueError when it is not exactly the contract."""
    try:
        return _runtime_from(json.loads(raw))
    except (TypeError, CpioError) as e:
        raise ValueError(f"runtime.json: {e}") from None


def _runtime_from(doc: Any) -> Runtime:
    if not isinstance(doc, dict) or set(doc) != {"cid", "size", "sha256", "sha512", "paths"}:
        raise ValueError("keys are not cid, paths, sha256, sha512, size")
    cid, size, paths = doc["cid"], doc["size"], doc["paths"]
    if not isinstance(cid, str) or not cid or type(size) is not int or size <= 0:
        raise ValueError("cid or size")
    sha256, sha512 = bytes.fromhex(doc["sha256"]), bytes.fromhex(doc["sha512"])
    if len(sha256) != 32 or len(sha512) != 64:
        raise ValueError("hash lengths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError("paths")
    if any(normalize_path(p) != p for p in paths) or len(set(paths)) != len(paths):
        raise ValueError("paths are not normalised, or repeat")
    return Runtime(cid, size, sha256, sha512, tuple(paths))


def runtime_prefix(initrd: bytes) -> int:
    """How many leading bytes of an image's initrd are its runtime layer, by the runtime.json the
    initrd itself carries (size and SHA-256 checked against the bytes); 0 when it carries none or
    it does not match, or nothing follows the layer. How a boot server splits a built bootstrap's
    initrd into the initrds boot.ipxe lists (cidboot.trust.measure.served_initrds), and how
    `firmware measure` reproduces that split. Host side: it decompresses the whole initrd, except
    a leading zstd frame (a runtime layer in zstd, which only the kernel unpacks): its end is read
    from its block headers (cpio.zstd_frame_end) and the archives after it are parsed, so the
    runtime.json found there must describe exactly the bytes up to that end."""
    start = 0
    try:
        if bytes(initrd[:4]) == ZSTD_MAGIC:
            start = zstd_frame_end(initrd, 0)
        members = parse_initramfs(initrd, start=start).members
    except (InitramfsError, ZstdFrameError):
        return 0
    raw = next((bytes(c) for m, c in reversed(members) if m.path == RUNTIME_JSON and stat.S_ISREG(m.mode)), None)
    if raw is None:
        return 0
    try:
        rt = parse_runtime_json(raw)
    except ValueError:
        return 0
    if start and rt.size != start:  # runtime.json names another cut than the frame's end
        return 0
    return rt.size if rt.size < len(initrd) and rt.begins(initrd) else 0


def running_runtime(root: str = "/") -> Runtime | None:
    """This image's runtime.json, or None when it is missing or anything in it is not exactly the
    contract (no reuse then: the full unpack; fail safe, never open)."""
    try:
        return parse_runtime_json(Path(root, RUNTIME_JSON).read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


# -- reading the initramfs --------------------------------------------------------------------


def _archive(buf: memoryview, off: int, out: list[tuple[Member, memoryview]]) -> int:
    """Parse the newc archive at `off` into `out` (contents are views into `buf`: no copies of
    the ~40 MB an image holds); returns the offset after its trailer. The header is read here
    rather than through `read_header` (same checks, `cpio.header_fields`): this loop runs once
    per member of every hand-over, under TCG at ~15x the host's cost."""
    start = off
    size_all = len(buf)
    while True:
        hdr = bytes(buf[off:off + 110])
        try:
            mode, size, major, minor, namesize = header_fields(hdr, off)
        except CpioError as e:
            raise InitramfsError(f"initramfs: {e}") from None
        name_end = off + 110 + namesize
        if namesize < 1 or name_end > size_all:
            raise InitramfsError(f"initramfs: name runs past the end at offset {off}")
        body = name_end + (-(name_end - start) % 4)
        if body + size > size_all:
            raise InitramfsError(f"initramfs: member at offset {off} runs past the end")
        end = body + size + (-(body + size - start) % 4)
        name = bytes(buf[off + 110:name_end - 1])
        if name == TRAILER_NAME:
            return min(end, size_all)
        if name == b".":  # `find . | cpio -o` archives start with the root itself
            off = end
            continue
        content = buf[body:body + size]
        try:
            path = normalize_path(name.decode())
        except (UnicodeDecodeError, CpioError) as e:
            raise InitramfsError(f"initramfs: member at offset {off}: {e}") from None
        target = bytes(content).decode(errors="replace") if stat.S_ISLNK(mode) else ""
        out.append((Member(path, mode, size, target, (major, minor)), content))
        off = end


def _walk(buf: memoryview, out: list[tuple[Member, memoryview]], where: str = "", off: int = 0) -> None:
    """Every archive in `buf` from `off`, as the kernel's unpacker finds them: zero padding
    skipped, each one uncompressed (at a 4-byte boundary), or a gzip or xz stream holding archives
    itself."""
    while off < len(buf):
        if buf[off] == 0:
            off += 1
            continue
        head = bytes(buf[off:off + 6])
        at = f"{where}offset {off}"
        if head == MAGIC:
            if off % 4:  # the kernel only looks for an uncompressed archive at a 4-byte boundary
                raise InitramfsError(f"initramfs: newc archive at {at} is not 4-byte aligned")
            off = _archive(buf, off, out)
            continue
        if head == XZ_MAGIC:
            import lzma  # here: the layers the stages build are gzip; an xz segment is rare

            d: Any = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            bad: tuple[type[Exception], ...] = (lzma.LZMAError,)
            kind = "xz"
        elif head[:2] == GZIP_MAGIC:
            d, bad, kind = zlib.decompressobj(wbits=31), (zlib.error,), "gzip"
        else:
            for magic, name in KNOWN_MAGICS.items():
                if head.startswith(magic):
                    raise UnsupportedCompression(f"initramfs: {name} at {at}: this stage unpacks gzip and xz only "
                                                 f"(Python 3.11 has no {name})")
            raise InitramfsError(f"initramfs: unknown data at {at}: {head.hex()}")
        try:
            data = d.decompress(buf[off:])
        except bad as e:
            raise InitramfsError(f"initramfs: {kind} stream at {at}: {e}") from None
        if not d.eof:
            raise InitramfsError(f"initramfs: {kind} stream at {at} is truncated")
        _walk(memoryview(data), out, f"{kind} stream at {at}: ")
        off = len(buf) - len(d.unused_data)


class Parsed:
    """The next stage's root, parsed and checked before anything is torn down: the members to
    write, and the paths of the running root to keep instead of writing them (the running
    runtime layer's, `Runtime.paths`; empty: a fresh root). A plain class: only read once made."""

    __slots__ = ("members", "keep")

    def __init__(self, members: list[tuple[Member, memoryview]], keep: tuple[str, ...] = ()) -> None:
        self.members = members
        self.keep = keep

    @property
    def files(self) -> int:
        return sum(1 for m, _ in self.members if stat.S_ISREG(m.mode))


def parse_initramfs(data: bytes, *, start: int = 0, keep: tuple[str, ...] = ()) -> Parsed:
    """Every member of every archive in `data` from offset `start`, paths normalised (none may
    escape the root); `keep`: the running root's paths that stand for `data[:start]` (or for a
    layer the caller never fetched). Raises InitramfsError (UnsupportedCompression for a
    compression we cannot read)."""
    members: list[tuple[Member, memoryview]] = []
    _walk(memoryview(data), members, off=start)
    if not members:
        raise InitramfsError("initramfs: no files" + (f" after the kept runtime ({start} bytes)" if keep else ""))
    return Parsed(members, keep)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        delete_tree(path, st.st_dev)
        os.rmdir(path)
    else:
        os.unlink(path)


def extract(parsed: Parsed, root: str = "/") -> None:
    """Write the members under `root` as the kernel's unpacker would (a later member replaces an
    earlier one of the same path). Call it after chroot into the new root: then `root` is "/"
    and absolute symlinks in the archive resolve inside it. Runs under umask 0, so that creating
    a file or directory gives it exactly the archive's permission bits without a chmod per
    member (set-id and sticky bits still get one: mkdir(2) may drop them); the caller's umask is
    restored after."""
    mask = os.umask(0)
    try:
        for m, content in parsed.members:
            path = os.path.join(root, m.path)
            perm = stat.S_IMODE(m.mode)
            if stat.S_ISDIR(m.mode):
                try:  # the root holds only the kept paths and what this loop wrote: most are new
                    os.mkdir(path, perm)
                    if perm & 0o7000:
                        os.chmod(path, perm)
                    continue
                except FileExistsError:
                    st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):  # a file or symlink (even to a directory) of that name
                    _remove(path)
                    os.mkdir(path, perm)
                    if perm & 0o7000:
                        os.chmod(path, perm)
                elif stat.S_IMODE(st.st_mode) != perm:
                    os.chmod(path, perm)
            elif stat.S_ISREG(m.mode):
                # a new inode, never an old one truncated: a kept file may be mapped by this process
                # (a shared library, the interpreter), and a hard-linked one must not change elsewhere
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    fd = os.open(path, flags, perm)
                except FileExistsError:
                    _remove(path)
                    fd = os.open(path, flags, perm)
                try:
                    view = memoryview(content)
                    while view:
                        view = view[os.write(fd, view):]
                    if perm & 0o7000:
                        os.fchmod(fd, perm)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(m.mode):
                _remove(path)
                os.symlink(m.target, path)
            elif stat.S_ISCHR(m.mode) or stat.S_ISBLK(m.mode):
                _remove(path)
                os.mknod(path, m.mode, os.makedev(*m.rdev))
            else:
                raise InitramfsError(f"initramfs: {m.path}: unsupported file type {oct(m.mode)}")
    finally:
        os.umask(mask)


# -- tearing down the old stage ---------------------------------------------------------------


def loaded_modules(proc_modules: str | os.PathLike[str] = "/proc/modules") -> set[str]:
    try:
        return {line.split()[0] for line in Path(proc_modules).read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        return set()


def unload(names: Iterable[str], proc_modules: str | os.PathLike[str] = "/proc/modules") -> list[str]:
    """delete_module(2) each of `names` that is loaded; returns the ones unloaded. A module that
    cannot be unloaded refuses the hand-over (the next stage would reach what it guards)."""
    loaded = loaded_modules(proc_modules)
    done = []
    for name in names:
        if name in loaded:
            try:
                syscalls.delete_module(name)
            except syscalls.SyscallError as e:
                raise SwitchRootError(f"unload {name}: {e}") from None
            done.append(name)
    return done


def mounts(path: str | os.PathLike[str] = "/proc/self/mounts") -> list[str]:
    """Mount points, in mount order (octal escapes of mountinfo decoded)."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out.append(_unescape(parts[1]))
    return out


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mount paths as \\ooo octal (done by
    hand: the "unicode_escape" codec is looked up by name, so images do not carry it)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def delete_tree(top: str, dev: int, keep: frozenset[str] = frozenset(), rel: str = "") -> int:
    """Delete everything under `top` on device `dev`, never crossing into another mount (as
    switch_root(8) frees the initramfs before moving the new root onto /), except the entries
    whose path relative to the root (`rel` is `top`'s, with a trailing slash) is in `keep` (a
    kept directory stays, its unlisted entries go). Returns how many entries were kept."""
    with os.scandir(top) as it:
        entries = list(it)
    kept = 0
    for e in entries:
        r = rel + e.name
        try:
            is_dir = e.is_dir(follow_symlinks=False)  # the directory entry's type: no lstat
        except FileNotFoundError:
            continue
        if is_dir:  # only a directory needs its device: a mount point is one (proc, sys, dev, the new root)
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_dev != dev:
                continue  # a mount point: left for umount
            kept += delete_tree(e.path, dev, keep, r + "/") if keep else delete_tree(e.path, dev)
            if r in keep:
                kept += 1
                continue
            try:
                os.rmdir(e.path)
            except OSError:
                pass  # holds a mount point further down
        elif r in keep:
            kept += 1
        else:
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise
                # a file mount point (unlink(2) refuses those): left for umount, as a directory one
    return kept


def prune_mount_points(points: Iterable[str], dev: int, keep: frozenset[str], root: str = "/") -> None:
    """After the unmounts, on a root that stays: delete what the old mount points hid (the
    archive's /dev nodes under devtmpfs...) and the mount point directories themselves, keeping
    only `keep`, so nothing of the old stage's root remains but the listed paths."""
    for point in sorted(points, key=len):
        try:
            rel = normalize_path(point)
        except CpioError:
            continue
        path = os.path.join(root, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # under a mount point deleted already
        if st.st_dev != dev or not stat.S_ISDIR(st.st_mode):
            continue  # still a mount (one we could not detach), or not ours
        delete_tree(path, dev, keep, rel + "/")
        if rel not in keep:
            try:
                os.rmdir(path)
            except OSError:
                pass


def close_fds(keep: int = 2) -> None:
    """Close every fd above `keep` (stdin/stdout/stderr are the console the next stage uses)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(keep + 1, 1024))
    for fd in fds:
        if fd > keep:
            try:
                os.close(fd)
            except OSError:
                pass


# -- the hand-over ----------------------------------------------------------------------------


def check_probes(secrets: Iterable[bytes | bytearray]) -> list[dict[str, str]]:
    """Debug builds: what the next stage searches its files for (never the secret itself)."""
    return [{"prefix": bytes(s[:4]).hex(), "sha256": hashlib.sha256(bytes(s)).hexdigest()} for s in secrets if s]


def debug_build(flag: str | os.PathLike[str] = CHECK_FLAG) -> bool:
    return Path(flag).is_file()


def handoff_files(handoff: Handoff) -> list[tuple[str, bytes, int]]:
    """(path, bytes, mode) of the hand-off files, as cidboot.stage.handoff.Handoff.to_cpio writes them."""
    handoff.validate()
    files = [(BOOT_PATH, canonical_json(handoff.boot), 0o644)]
    if handoff.dice is not None:
        files.append((DICE_PATH, handoff.dice, 0o600))
    return files


def switch_root(parsed: Parsed, handoff: Handoff, *, secrets: Iterable[bytearray] = (), new_root: str = NEW_ROOT,
                unload_modules: Iterable[str] = UNLOAD, init: str = INIT,
                log: Callable[[str], None] = lambda _m: None) -> None:
    """Steps 2-6 of the module docstring. Only as PID 1; returns only by raising. With
    `parsed.keep` (the running runtime's paths) the root stays where it is: everything but those
    paths is deleted, and `parsed` is unpacked onto it."""
    if os.getpid() != 1:
        raise SwitchRootError("refusing to switch root: not PID 1 (this would take the host's root away)")
    files = handoff_files(handoff)
    gone = unload(unload_modules)
    if gone:
        log(f"unloaded {' '.join(gone)}")
    keep = frozenset(parsed.keep)
    old = [m for m in mounts() if m != "/" and (keep or m != new_root)]
    if not keep:
        os.makedirs(new_root, exist_ok=True)
        try:
            syscalls.mount("tmpfs", new_root, "tmpfs", 0, "mode=0755")
        except syscalls.SyscallError as e:
            raise SwitchRootError(f"tmpfs for the new root: {e}") from None
    # from here the old root is being dismantled: no imports, nothing that opens files in it, and no
    # cyclic garbage collected (a file object's finalizer closing an fd) until the exec; the old
    # stage's objects go with its address space (a full collection cost ~40 ms under TCG)
    gc.disable()
    t0 = time.monotonic()
    dev = os.lstat("/").st_dev
    kept = delete_tree("/", dev, keep)
    for target in sorted(old, key=len, reverse=True):
        try:
            syscalls.umount2(target, syscalls.MNT_DETACH)
        except syscalls.SyscallError as e:
            raise SwitchRootError(str(e)) from None
    try:
        if keep:  # this root stays: what the mounts hid goes too, then the next stage's other layers
            os.chdir("/")
            prune_mount_points(old, dev, keep)
        else:
            os.chdir(new_root)
            syscalls.mount(".", "/", None, syscalls.MS_MOVE)
            os.chroot(".")
            os.chdir("/")
        t1 = time.monotonic()
        extract(parsed)
        for path, data, mode in files:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            try:
                os.write(fd, data)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
    except (OSError, syscalls.SyscallError) as e:
        raise SwitchRootError(f"new root: {e}") from None
    finally:
        for s in secrets:
            wipe(s)
        if handoff.dice is not None:
            wipe(handoff.dice)
        for _p, data, _m in files:
            wipe(data)
    # the console's timeline: taking the old root down, writing the new one
    log(f"new root ready: {kept} entries kept, {parsed.files} files written "
        f"(teardown={t1 - t0:.2f}s write={time.monotonic() - t1:.2f}s)")
    close_fds()
    os.execve(init, [init], {"PATH": "/usr/bin:/bin", "TERM": os.environ.get("TERM", "linux")})


def keep_plan(initrd: bytes, runtime: Runtime | None, *, omitted: bool = False, image_root: str = "/",
              log: Callable[[str], None] = lambda _m: None) -> tuple[int, tuple[str, ...]]:
    """(start, keep): how many leading bytes of `initrd` the running root stands for, and the
    paths it keeps for them. The running runtime layer (`runtime`, this image's runtime.json) is
    kept when `initrd` begins with exactly its bytes (size, then SHA-256) and the running root
    still has every path it lists; otherwise (0, ()): the full unpack. `omitted`: the caller did
    not fetch that layer because it is the running one (by CID or signed hash), so `initrd` is
    only the layers after it: (0, paths), or RuntimeMissing when the running root cannot supply it."""
    if runtime is None:
        if omitted:
            raise RuntimeMissing("the runtime layer was not fetched and this image has no valid runtime.json")
        return 0, ()
    if not omitted and not runtime.begins(initrd):
        return 0, ()
    gap = runtime.missing(image_root)
    if gap is not None:
        if omitted:
            raise RuntimeMissing(f"the runtime layer was not fetched and the running root lacks {gap}")
        log(f"the running root lacks {gap}: unpacking the runtime layer too")
        return 0, ()
    return (0 if omitted else runtime.size), runtime.paths


def try_switch_root(initrd: bytes, handoff: Handoff, *, secrets: Iterable[bytearray] = (),
                    log: Callable[[str], None] = lambda _m: None, runtime: Runtime | None = None,
                    fetch_runtime: Callable[[], bytes] | None = None, image_root: str = "/") -> bytes:
    """Switch root into the next stage, which runs on this kernel (returns only by raising);
    when this stage cannot unpack its initramfs, the whole initramfs for a kexec instead (the
    runtime layer fetched first when the caller had left it out). `runtime` defaults to this
    image's runtime.json; `fetch_runtime` as for `hand_over`."""
    secrets = list(secrets)
    t0 = time.monotonic()
    if runtime is None:
        runtime = running_runtime(image_root)
    try:
        start, keep = keep_plan(initrd, runtime, omitted=fetch_runtime is not None, image_root=image_root, log=log)
    except RuntimeMissing as e:
        assert fetch_runtime is not None
        log(f"{e}: fetching it")
        initrd, fetch_runtime = fetch_runtime() + initrd, None
        start, keep = 0, ()
    try:
        parsed = parse_initramfs(initrd, start=start, keep=keep)
    except UnsupportedCompression as e:  # the kernel reads it (CONFIG_RD_ZSTD...): kexec, never a half-unpacked root
        log(f"{e}: kexec instead, the kernel unpacks it")
    else:
        say(f"cidboot-stage: handover switch_root files={parsed.files} kept={len(parsed.keep)} "
            f"parse={time.monotonic() - t0:.2f}s")
        switch_root(parsed, handoff, secrets=secrets, log=log)
    return initrd if fetch_runtime is None else fetch_runtime() + initrd


def hand_over(kernel: bytes, initrd: bytes, cmdline: str, handoff: Handoff, *, secrets: Iterable[bytearray] = (),
              forced: bool = False, running: bytes | None = None, running_cmdline: str | None = None,
              log: Callable[[str], None] = lambda _m: None, runtime: Runtime | None = None,
              fetch_runtime: Callable[[], bytes] | None = None, image_root: str = "/") -> None:
    """Start the next stage (kernel, initrd, cmdline, hand-off) the cheapest sound way: in this
    kernel when it is the same kernel (`decide`), by kexec otherwise. Wipes `secrets` either way.
    Returns only by raising. `running` defaults to this image's /etc/cidboot/kernel.sha512,
    `running_cmdline` to /proc/cmdline, `runtime` to this image's runtime.json (`keep_plan`).
    `fetch_runtime`: `initrd` lacks its first layer, the runtime, because it is the running one;
    the callable fetches and verifies it when it is needed after all (a kexec)."""
    secrets = list(secrets)
    if forced:  # a stage started by kexec cannot see the command line that forced it: tell it
        handoff.boot["handover"] = "kexec"
    if running is None:
        running = running_kernel_sha512()
    if running_cmdline is None:
        running_cmdline = proc_cmdline()
    how = decide(kernel, running=running, forced=forced, cmdline=cmdline, running_cmdline=running_cmdline)
    if how == "switch_root":
        initrd = try_switch_root(initrd, handoff, secrets=secrets, log=log, runtime=runtime,
                                 fetch_runtime=fetch_runtime, image_root=image_root)
    elif fetch_runtime is not None:
        initrd = fetch_runtime() + initrd
    kexec_hand_over(kernel, initrd, cmdline, handoff, secrets=secrets)


def kexec_hand_over(kernel: bytes, initrd: bytes, cmdline: str, handoff: Handoff, *,
                    secrets: Iterable[bytearray] = ()) -> None:
    """The kexec path: the hand-off appended to `initrd` as a cpio, the secrets wiped, kexec.
    Returns only if kexec_boot does."""
    from cidboot.stage.kexec import kexec_boot

    say("cidboot-stage: handover kexec")
    with_handoff = handoff.append_to(initrd)
    if handoff.dice is not None:
        wipe(handoff.dice)
    for s in secrets:
        wipe(s)
    kexec_boot(kernel, with_handoff, cmdline)


def hand_over_running(initrd: bytes, cmdline: str, handoff: Handoff, fetch_kernel: Callable[[], bytes], *,
                      secrets: Iterable[bytearray] = (), log: Callable[[str], None] = lambda _m: None,
                      runtime: Runtime | None = None, fetch_runtime: Callable[[], bytes] | None = None,
                      image_root: str = "/") -> None:
    """Start the next stage in the running kernel when its kernel's bytes were never fetched,
    because the stage had already established that they are the running kernel's (by a hash or
    CID, with the parameters in effect and no kexec forced). Returns only by raising. When the
    initramfs cannot be unpacked here (a compression this stage cannot read), `fetch_kernel()`
    fetches the bytes, which must be the kernel the stage measured (the callable checks that and
    raises otherwise), and the next stage is kexec'ed. `runtime`, `fetch_runtime`: as for
    `hand_over` (the runtime layer kept, or left out of `initrd` and fetched only for a kexec)."""
    secrets = list(secrets)
    initrd = try_switch_root(initrd, handoff, secrets=secrets, log=log, runtime=runtime,
                             fetch_runtime=fetch_runtime, image_root=image_root)
    log("fetching the kernel for the kexec")
    kexec_hand_over(fetch_kernel(), initrd, cmdline, handoff, secrets=secrets)


# -- debug builds: what the next stage can reach ----------------------------------------------


def scan(probes: list[dict[str, str]], root: str = "/") -> tuple[int, int, int]:
    """Search every regular file under `root` on the root's device (not /proc, /sys, /dev) for
    each probe; returns (hits, files, bytes)."""
    want = [(bytes.fromhex(p["prefix"]), p["sha256"]) for p in probes]
    dev = os.lstat(root).st_dev
    hits = files = total = 0
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if st.st_dev != dev:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            elif stat.S_ISREG(st.st_mode):
                try:
                    data = Path(e.path).read_bytes()
                except OSError:
                    continue
                files += 1
                total += len(data)
                for prefix, digest in want:
                    i = data.find(prefix)
                    while i >= 0:
                        if hashlib.sha256(data[i:i + 32]).hexdigest() == digest:
                            hits += 1
                        i = data.find(prefix, i + 1)
    return hits, files, total


def report_handover_check(boot: dict[str, Any], stage: str, *, root: str = "/",
                          proc_modules: str = "/proc/modules") -> str | None:
    """When the previous stage was a debug build (boot.json has `handover_check`), print what
    this stage can reach of it: the hand-off file, qemu_fw_cfg, the previous stage's secrets in
    any file. Production hand-offs carry no probes and nothing is printed."""
    probes = boot.get("handover_check")
    if not isinstance(probes, list):
        return None
    hits, files, total = scan(probes, root)
    dice_gone = not os.path.lexists(os.path.join(root, DICE_PATH))
    fw_cfg = "loaded" if "qemu_fw_cfg" in loaded_modules(proc_modules) else "absent"
    fw_sys = "present" if os.path.exists(os.path.join(root, "sys/firmware/qemu_fw_cfg")) else "absent"
    line = (f"cidboot: handover-check: stage={stage} dice.cbor={'gone' if dice_gone else 'present'} "
            f"qemu_fw_cfg={fw_cfg} sysfs_fw_cfg={fw_sys} secrets_found={hits} probes={len(probes)} "
            f"files={files} bytes={total}")
    say(line)
    return line
