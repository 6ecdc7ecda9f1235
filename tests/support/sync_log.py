"""What a unit test's code made durable (the `sync_log` fixture in tests/unit/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyncLog:
    """What a test's code made durable: the path of every fsync/fdatasync (`files`), and every
    whole-file-system sync (`syncfs` of the block store, `os.sync`) in `whole`."""

    files: list[str] = field(default_factory=list)
    whole: list[object] = field(default_factory=list)
