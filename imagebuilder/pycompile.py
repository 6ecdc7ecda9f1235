"""Reproducible bytecode for the target interpreter (Debian python3.11 3.11.2).

Debian's packages ship no .pyc, and compiling at every boot roughly doubles start-up under
emulation, so the image carries bytecode compiled at build time with the unchecked-hash
invalidation mode (PEP 552): no source mtimes in the files, and the interpreter never
re-checks them on a read-only root. Bytecode is only valid for the same magic number, so
the host compiler must match the target's (3.11.x all use 3495).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import py_compile
import tempfile
from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]  # py_compile's own writer
from pathlib import Path
from typing import TypeVar

from cidboot.errors import CidbootError

TARGET_VERSION = "3.11"
TARGET_MAGIC = (3495).to_bytes(2, "little") + b"\r\n"
CACHE_TAG = "cpython-311"


class BytecodeMismatchError(CidbootError):
    """The build host's compiler emits bytecode the target interpreter cannot load."""


def check_magic() -> None:
    if importlib.util.MAGIC_NUMBER != TARGET_MAGIC:
        raise BytecodeMismatchError(
            f"host Python magic {importlib.util.MAGIC_NUMBER!r} differs from the target's {TARGET_MAGIC!r} "
            f"(Python {TARGET_VERSION}); run the image builder with a Python {TARGET_VERSION} interpreter")


def pyc_path(image_path: str) -> str:
    """Where the interpreter looks for a module's bytecode: dir/__pycache__/mod.cpython-311.pyc."""
    d, _, f = image_path.rpartition("/")
    return f"{d}/__pycache__/{f[:-3]}.{CACHE_TAG}.pyc"


def sourceless_path(image_path: str) -> str:
    """Where bytecode shipped without its source must be: dir/mod.pyc (PEP 3147's sourceless
    case; the import system reads __pycache__/ only for a module whose .py exists)."""
    return image_path[:-3] + ".pyc"


class _NoDocstrings(ast.NodeTransformer):
    """Drop the docstring of every module, class and function (a body left empty gets `pass`)."""

    def _strip(self, node: _Documented) -> _Documented:
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.copy_location(ast.Pass(), body[0])]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


_Documented = TypeVar("_Documented", ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def compile_source(source: bytes, image_path: str, docstrings: bool = True) -> bytes:
    """Bytecode for `source` as if it lived at `image_path` in the image (that path goes in
    tracebacks, not the build directory).

    `docstrings=False` (the runtime layer's stdlib and package modules): `__doc__` is None in every
    module, class and function, as under `python -OO`, but asserts and `if __debug__:` stay (not
    `optimize=2`, which drops those too): the docstrings were ~0.3 MB of the L1 initramfs's zstd
    (docs/images.md, 8 MiB budget), and CPython's own tests run the stdlib under -OO. Line numbers
    are the source's (the transform removes statements, it moves none). The header is the same
    unchecked-hash form, with the hash of the source as shipped in the pinned package."""
    check_magic()
    if not docstrings:
        tree = _NoDocstrings().visit(ast.parse(source, "/" + image_path.lstrip("/")))
        code = compile(tree, "/" + image_path.lstrip("/"), "exec", dont_inherit=True, optimize=0)
        return bytes(_code_to_hash_pyc(code, importlib.util.source_hash(source), False))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "m.py")
        src.write_bytes(source)
        out = Path(tmp, "m.pyc")
        os.utime(src, (0, 0))
        py_compile.compile(str(src), cfile=str(out), dfile="/" + image_path.lstrip("/"), doraise=True,
                           optimize=0, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        return out.read_bytes()
