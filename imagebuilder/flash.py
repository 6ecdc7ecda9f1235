"""The firmware's boot files as a board's flash holds them.

A `target: firmware` build is a signed manifest of layers (kernel, runtime, ...), like every
stage. The board's boot ROM (its DICE engine) does not fetch layers: it loads one kernel and
one initrd from flash and measures them, and the L0 reference value the build pins in the
manifest (`measurements["firmware"]`) is over exactly those bytes: the kernel and the layers'
newc archives uncompressed, one after the other (imagebuilder.cpio.flash_initrd; why
uncompressed: docs/images.md, "The firmware's flash"). This module makes those two files from
the store and refuses to hand out files whose code hash is not the manifest's reference, so
what gets flashed is what verifiers will affirm.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.ipld.unixfs import export_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import SignedManifest
from cidboot.trust.measure import boot_code_hash
from imagebuilder.cpio import flash_initrd


class FlashError(CidbootError):
    """The manifest is not a firmware build, or its files do not give its own L0 reference value."""


@dataclass(frozen=True)
class FlashImage:
    """The two files a board's boot flash holds, and the L0 code hash the engine will measure."""

    manifest: CID
    kernel: bytes
    initrd: bytes
    code_hash: bytes
    cmdline: str

    def write(self, out: Path) -> tuple[Path, Path]:
        """`vmlinuz` and `initrd.img` in `out` (created); each written whole, then renamed."""
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / "vmlinuz", out / "initrd.img")
        for path, data in zip(paths, (self.kernel, self.initrd), strict=True):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return paths


def flash_image(store: Blockstore, mcid: CID) -> FlashImage:
    """The flash files of the firmware manifest `mcid`, checked against its own L0 reference.

    Fails closed: a manifest without a `firmware` measurement (not a firmware build, or built
    before the reference was pinned) has nothing to check the files against and is refused, as
    is one with encrypted layers (a boot ROM has no key to decrypt them)."""
    signed = SignedManifest.decode(store.get(mcid))
    m = signed.manifest
    want = m.measurements.get("firmware")
    if want is None:
        raise FlashError(f"manifest {mcid} ({m.name}) has no `firmware` measurement: not a `target: firmware` "
                         "build, so there is no L0 reference value to check flash files against")
    if any(lyr.encrypted for lyr in m.layers):
        raise FlashError(f"manifest {mcid} ({m.name}) has encrypted layers: a boot ROM loads its flash in clear")
    roles = [lyr.role for lyr in m.layers]
    if not roles or roles[0] != "kernel":
        raise FlashError(f"manifest {mcid} ({m.name}): the first layer is {roles[0] if roles else 'missing'}, "
                         "not the kernel")
    data = [b"".join(export_file(lyr.cid, store.get)) for lyr in m.layers]
    kernel, initrd = data[0], flash_initrd(data[1:])
    got = boot_code_hash(kernel, [initrd])
    if not hmac.compare_digest(got, want):
        raise FlashError(f"manifest {mcid} ({m.name}): the flash files hash to {got.hex()}, not the manifest's "
                         f"L0 reference {want.hex()}; refusing to write files verifiers would not affirm")
    return FlashImage(mcid, kernel, initrd, got, m.cmdline)
