"""The `bootstrap` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cidboot.cli import run_main

DESCRIPTION = "Serve network boot (DHCP/TFTP/HTTP gateway) and run the L1 bootstrap stage."


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("bootstrap", DESCRIPTION, "bootstrap.commands", argv)


if __name__ == "__main__":
    sys.exit(main())
