"""UnixFS: files and directories as dag-pb DAGs, byte-compatible with Kubo's `ipfs add`.

`import_file` / `import_path` build the DAG (streaming, bounded memory); `export_file`,
`export_range` and `list_dir` read it back through any `get_block` callable, so the same code
serves the local store, the gateway and a verifying network fetch.
"""

from cidboot.ipld.unixfs.data import UnixFSData, UnixFSError
from cidboot.ipld.unixfs.exporter import (
    DirEntry,
    export_file,
    export_range,
    file_size,
    list_dir,
    resolve_path,
)
from cidboot.ipld.unixfs.importer import (
    DEFAULT_CHUNK,
    ImportOptions,
    ImportResult,
    import_bytes,
    import_file,
    import_path,
)

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
