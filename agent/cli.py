"""The `agent` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cidboot.cli import run_main

DESCRIPTION = "Run provenance-gated dataflows, attest, and verify attestation evidence."


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("agent", DESCRIPTION, "agent.commands", argv)


if __name__ == "__main__":
    sys.exit(main())
