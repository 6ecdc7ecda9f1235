"""What a stage says on the console, and how it forgets its secrets.

The console protocol (docs/boot-chain.md) is how a harness, a bench or an operator with a serial
cable follows a boot: `cidboot-stage: ...` progress lines and `cidboot: refused: <check>: <why>`
for a check that failed. Every stage uses these helpers so the lines stay parseable.
"""

from __future__ import annotations

import ctypes
import sys

from cidboot.errors import VerificationError

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; importing `typing` cost the firmware ~9 ms of instructions (TCG)
if TYPE_CHECKING:
    from typing import TextIO


class StageRefused(VerificationError):
    """A boot stage refuses to go on: `check` names what failed (e.g. "layer bafy...",
    "rollback"), `detail` says why. Printed as `cidboot: refused: <check>: <detail>`."""

    def __init__(self, check: str, detail: str = "") -> None:
        super().__init__(f"{check}: {detail}" if detail else check)
        self.check, self.detail = check, detail


def say(line: str, out: TextIO | None = None) -> None:
    """One console protocol line; PID 1's stdout is the console, flushed at once so the line
    is out before a power-off or kexec."""
    print(line, file=out or sys.stdout, flush=True)


def refused_line(e: StageRefused) -> str:
    return f"cidboot: refused: {e}"


def wipe(secret: bytes | bytearray) -> None:
    """Overwrite a secret in place. bytes are immutable to Python, not to memory: CPython keeps
    their content inline, so the buffer is zeroed through ctypes. Only for private objects such
    as CDIs made by HKDF or cbor2 (never interned: a 0- or 1-byte value may be shared)."""
    if isinstance(secret, bytearray):
        secret[:] = bytes(len(secret))
    elif len(secret) > 1:
        ctypes.memset(ctypes.c_char_p(secret), 0, len(secret))
