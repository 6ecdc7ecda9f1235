"""The `firmware` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cidboot.cli import run_main

DESCRIPTION = ("The L0 network-boot stage: DHCP, TFTP, measure, derive DICE CDI_1, hand over. "
               "`firmware run` is the stage itself (PID 1 of the firmware image only); "
               "`firmware measure` prints what it would measure, for reference values.")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("firmware", DESCRIPTION, "firmware.commands", argv)


if __name__ == "__main__":
    sys.exit(main())
