"""The `imagebuilder` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cidboot.cli import run_main

DESCRIPTION = "Build, add, sign, inspect, verify and publish content-addressed boot images."


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("imagebuilder", DESCRIPTION, "imagebuilder.commands", argv)


if __name__ == "__main__":
    sys.exit(main())
