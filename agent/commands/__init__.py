"""Subcommands, one module each (discovered by cidboot.cli)."""
