"""The stage-to-stage hand-off (docs/boot-chain.md, "Hand-offs"): what one boot stage passes the
next, two files in the next stage's root. Across kexec the sending stage appends them as an
uncompressed newc cpio to the next stage's initrd (the kernel unpacks concatenated archives into
the same rootfs); in a same-kernel hand-over cidboot.stage.switch_root writes them into the new
root before exec'ing its /init. Either way the next stage's root holds

- `run/cidboot/dice.cbor` (mode 0600): the DICE handover `{1: CDI_Attest, 2: CDI_Seal, 3: chain}`
  with the *next* layer's CDIs; absent for unmeasured boots;
- `run/cidboot/boot.json`: canonical JSON (sorted keys, no spaces) with at least `boot_mode`
  ("measured" | "unmeasured"), the boot config, and the manifest CID once known.

The receiving stage calls `load()` first thing: it reads both files and overwrites and deletes
`dice.cbor` at once, so the CDIs live on only in that process's memory.

    h = Handoff(dice=encode_handover(a1, s1, chain), boot={"boot_mode": "measured", "bootconfig": cfg})
    cidboot.stage.switch_root.hand_over(kernel, initrd, cmdline, h)   # sender: switch_root or kexec
    h = cidboot.stage.handoff.load()             # receiver (as PID 1, root "/")
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cidboot.errors import FormatError, NotFoundError

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; importing `typing` cost the firmware ~9 ms of instructions (TCG)
if TYPE_CHECKING:
    from typing import Any

DIR = "run/cidboot"
DICE_PATH = f"{DIR}/dice.cbor"
BOOT_PATH = f"{DIR}/boot.json"
BOOT_MODES = ("measured", "unmeasured")
MAX_BOOT_JSON = 1 << 20  # a boot config is a few KiB; anything huge is not ours


class HandoffError(FormatError):
    """The hand-off archive or files are malformed (the message names the file and the defect)."""


class HandoffNotFound(NotFoundError):
    """No hand-off at all: this stage was not started by a previous cidboot stage (e.g. iPXE)."""


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The one byte form of boot.json (sorted keys, no spaces, UTF-8), so it can be measured."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _check(dice: bytes | None, boot: Any) -> None:
    if not isinstance(boot, dict):
        raise HandoffError(f"{BOOT_PATH}: must be a JSON object, got {type(boot).__name__}")
    if not all(isinstance(k, str) for k in boot):
        raise HandoffError(f"{BOOT_PATH}: keys must be strings")
    mode = boot.get("boot_mode")
    if mode not in BOOT_MODES:
        raise HandoffError(f"{BOOT_PATH}: boot_mode must be one of {BOOT_MODES}, got {mode!r}")
    if mode == "measured" and dice is None:
        raise HandoffError(f"{BOOT_PATH}: boot_mode is measured but {DICE_PATH} is missing")
    if mode == "unmeasured" and dice is not None:
        raise HandoffError(f"{BOOT_PATH}: boot_mode is unmeasured but {DICE_PATH} is present")
    if dice is not None:
        if not dice:
            raise HandoffError(f"{DICE_PATH}: empty")
        from cidboot.trust.dice.chain import HandoverError, decode_handover

        try:
            decode_handover(dice)
        except HandoverError as e:
            raise HandoffError(f"{DICE_PATH}: {e}") from None


class Handoff:
    """What a stage hands the next. `dice` is the encoded DICE handover (cidboot.trust.dice.encode_handover)
    or None for an unmeasured boot; `boot` is the boot.json object (must hold `boot_mode`).
    A plain class with field equality rather than a dataclass (whose generated methods cost every
    stage ~2 M guest instructions at import); its repr gives the hand-over's length, never its CDIs."""

    __slots__ = ("dice", "boot")

    def __init__(self, dice: bytes | None, boot: dict[str, Any] | None = None) -> None:
        self.dice = dice
        self.boot: dict[str, Any] = {} if boot is None else boot

    def __eq__(self, other: object) -> bool:
        return type(other) is Handoff and self.dice == other.dice and self.boot == other.boot

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return f"Handoff(dice={'None' if self.dice is None else f'<{len(self.dice)} bytes>'}, boot={self.boot!r})"

    def validate(self) -> None:
        """Raise HandoffError unless the two parts are well formed and agree on the boot mode."""
        _check(self.dice, self.boot)

    def to_cpio(self) -> bytes:
        """The uncompressed newc archive (reproducible: mtime 0, fixed inode order)."""
        # only a kexec sender writes one: cpio is not every stage's to import at start
        from cidboot.stage.cpio import Entry, archive_bytes

        self.validate()
        try:
            boot = canonical_json(self.boot)
        except (TypeError, ValueError) as e:
            raise HandoffError(f"{BOOT_PATH}: not JSON-serialisable: {e}") from None
        entries = [Entry.file(BOOT_PATH, boot, 0o644)]
        if self.dice is not None:
            entries.append(Entry.file(DICE_PATH, self.dice, 0o600))
        return archive_bytes(entries, mtime=0)

    def append_to(self, initrd: bytes) -> bytes:
        """`initrd` + this hand-off. The kernel only recognises an uncompressed archive that starts
        at a 4-byte aligned offset after the previous one, so the initrd is zero-padded first."""
        return initrd + b"\0" * (-len(initrd) % 4) + self.to_cpio()


def _erase(path: Path) -> None:
    """Overwrite the file's bytes with zeros, then unlink it: on rootfs (ramfs/tmpfs) the pages
    are reused in place, so this clears the CDIs rather than only forgetting the name."""
    try:
        size = path.stat().st_size
        with open(path, "r+b", buffering=0) as f:
            f.write(b"\0" * size)
            os.fsync(f.fileno())
    finally:
        path.unlink(missing_ok=True)


def load(root: str | os.PathLike[str] = "/") -> Handoff:
    """Read the hand-off under `root`, erasing dice.cbor before returning (even when invalid).

    Raises HandoffNotFound when neither file exists (the stage was not started by a cidboot
    stage: an iPXE boot is unmeasured), HandoffError when anything is malformed.
    """
    base = Path(root)
    dice_p, boot_p = base / DICE_PATH, base / BOOT_PATH
    dice: bytes | None = None
    if dice_p.exists() or dice_p.is_symlink():
        try:
            st = dice_p.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise HandoffError(f"{DICE_PATH}: not a regular file")
            dice = dice_p.read_bytes()
        finally:
            if dice_p.is_symlink() or not dice_p.is_file():
                dice_p.unlink(missing_ok=True)
            else:
                _erase(dice_p)
    if not boot_p.exists():
        if dice is None:
            raise HandoffNotFound(f"no hand-off: {boot_p} does not exist")
        raise HandoffError(f"{BOOT_PATH}: missing beside {DICE_PATH}")
    raw = boot_p.read_bytes()
    if len(raw) > MAX_BOOT_JSON:
        raise HandoffError(f"{BOOT_PATH}: {len(raw)} bytes, more than {MAX_BOOT_JSON}")
    try:
        boot = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HandoffError(f"{BOOT_PATH}: not JSON: {e}") from None
    _check(dice, boot)
    return Handoff(dice, boot)
