"""UnixFS: files and directories as dag-pb DAGs, byte-compatible with Kubo's `ipfs add`.

`import_file` / `import_path` build the DAG (streaming, bounded memory); `export_file`,
`export_range` and `list_dir` read it back through any `get_block` callable, so the same code
serves the local store, the gateway and a verifying network fetch.
"""

from typing import TYPE_CHECKING, Any

from cidboot.ipld.unixfs.data import UnixFSData, UnixFSError
from cidboot.ipld.unixfs.exporter import (
    DirEntry,
    export_file,
    export_range,
    file_size,
    list_dir,
    resolve_path,
)

if TYPE_CHECKING:
    from cidboot.ipld.unixfs.importer import (
        DEFAULT_CHUNK,
        ImportOptions,
        ImportResult,
        import_bytes,
        import_file,
        import_path,
    )

# the importer's names are loaded on first use (PEP 562): a boot stage reads UnixFS (the
# exporter, through cidboot.store.gateway.client) and never builds it, and importing this
# package for its exporter should not cost the stage the importer's start-up
_IMPORTER = frozenset({"DEFAULT_CHUNK", "ImportOptions", "ImportResult", "import_bytes", "import_file", "import_path"})


def __getattr__(name: str) -> Any:
    if name in _IMPORTER:
        from cidboot.ipld.unixfs import importer

        return getattr(importer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_CHUNK",
    "DirEntry",
    "ImportOptions",
    "ImportResult",
    "UnixFSData",
    "UnixFSError",
    "export_file",
    "export_range",
    "file_size",
    "import_bytes",
    "import_file",
    "import_path",
    "list_dir",
    "resolve_path",
]
