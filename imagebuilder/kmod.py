"""Kernel modules of an image, in load order: read each module's `.modinfo` (`depends=`) with
pyelftools and order dependencies first, as modprobe would.

Host side: the image builder resolves the order once and writes it to /etc/cidboot/modules, so
the stages' PID 1 (cidboot.stage.pid1) only calls finit_module(2) down the list and carries no
ELF parser.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cidboot.errors import FormatError, NotFoundError


class ModuleNotFound(NotFoundError):
    """A kernel module (or one it depends on) is not in the image."""


class NotAModule(FormatError):
    """A .ko that is not an ELF kernel module."""


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `.modinfo` section of a .ko: key -> values (NUL-separated key=value strings)."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        sec = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError as e:
        raise NotAModule(f"not a kernel module: {e}") from None
    out: dict[str, list[str]] = {}
    if sec is None:
        return out
    for item in sec.data().split(b"\0"):
        k, sep, v = item.decode(errors="replace").partition("=")
        if sep:
            out.setdefault(k, []).append(v)
    return out


def module_index(root: str | Path) -> dict[str, Path]:
    """Module name -> .ko path under a modules directory ('-' and '_' are the same name)."""
    return {p.name.removesuffix(".ko").replace("-", "_"): p for p in sorted(Path(root).rglob("*.ko"))}


def load_order(names: Iterable[str], index: dict[str, Path]) -> list[str]:
    """Dependencies first (post-order over `depends=`), each module once."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        n = name.replace("-", "_")
        if n in seen:
            return
        if n not in index:
            via = f" (needed by {' -> '.join(chain)})" if chain else ""
            raise ModuleNotFound(f"kernel module {n} not in the image{via}")
        seen.add(n)
        deps = modinfo(index[n].read_bytes()).get("depends", [""])[0]
        for d in sorted(x for x in deps.split(",") if x):
            visit(d, (*chain, n))
        order.append(n)

    for name in names:
        visit(name, ())
    return order


