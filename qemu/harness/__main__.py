"""`python -m qemu.harness boot|demo`: boot flows on QEMU devices over a real boot network."""

from __future__ import annotations

import sys

from cidboot.cli import run_main

DESCRIPTION = ("Boot QEMU devices from power-on through firmware, bootstrap and agent over a throwaway "
               "network namespace, playing the DICE engine and the factory; appraise each device.")

if __name__ == "__main__":
    sys.exit(run_main("python -m qemu.harness", DESCRIPTION, "qemu.harness.commands"))
