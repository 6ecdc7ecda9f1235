"""Subcommands of `python -m qemu.harness` (one module each, see cidboot.cli)."""
