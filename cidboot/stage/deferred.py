"""Deferred imports of a few stdlib modules a stage imports but does not use at start.

Why: under TCG every module a stage imports costs its bytecode's execution, and the three
stages each pay it again. The stdlib `dataclasses` imports `inspect` at its top (and with it
`ast`, `dis`, `tokenize`, `linecache`, `importlib.machinery`: about 30 M guest instructions,
a tenth of a second or more of wall time per stage under TCG), yet calls it in one place only:
`inspect.signature(cls)`, to make a docstring for a dataclass that has none. Every dataclass on
the stages' start paths has a docstring, so none of that code runs at start.

`install()` (called by cidboot.stage.pid1.run_stage before the stage is imported) puts a
`DeferredModule` into `sys.modules` for each name in DEFERRED that is not imported yet. An
`import inspect` then binds that object without running the module; the first access of any
other attribute (`inspect.signature`, `from inspect import x`) runs the real module into that
same object, under a lock (the stages have threads), and from then on it is the plain module.
So a deferred module behaves as if imported eagerly, only later: nothing is skipped, no check is
turned off. It must exist at install time (a stage image without it fails at start, as the
eager import would have), and if running it fails on first use, the error propagates to the
code that used it, every time it is used: never a half-initialised module.

Why not importlib.util.LazyLoader: in 3.11 the import system reads `__spec__` of a module
found in sys.modules at every `import` statement (import_ensure_initialized), and LazyLoader
loads on any attribute access, so dataclasses' own `import inspect` would load it at once;
3.11's LazyLoader also has no lock. Here the attributes the import system reads
(NOT_A_USE) do not count as a use.

The list, and why each is safe. Any one is, by construction: its first real use runs it, so the
worst case is the eager import's cost, paid later. Each is on the list because the stages import it
(through the stdlib) and, on the way to their job, never use it; tests/unit/test_deferred.py
imports the three stages' start paths and checks every one stays deferred:
- inspect (with ast, dis, tokenize, ~30 M instructions): dataclasses imports it to write a
  docstring for a dataclass that has none; every start-path dataclass has its own (the test
  names one that does not).
- traceback (with linecache, tokenize, token, textwrap): logging imports it to format an
  exception; pid1's fatal path and an error being logged use it.
- ssl (and the _ssl extension, OpenSSL's initialisation): http.client imports it to define
  HTTPSConnection; only an https:// gateway or events URL uses it.
- calendar (and locale): email._parseaddr imports it to parse dates in mail headers; nothing on
  the boot path parses one.
- mimetypes: http.server imports it for SimpleHTTPRequestHandler, which no stage serves.
- ipaddress: urllib.parse imports it (pathlib imports urllib.parse) to check a bracketed IPv6
  host; the stages' own address conversions use cidboot.netboot.ipv4.
- datetime: email.utils imports it (through http.client and http.server) to format and parse
  dates in headers; the agent's API answers its first request with a Date header, after `agent
  ready` (that request pays it, ~4 M instructions); code that uses it earlier runs it then.

With `-X importtime` (cidboot_importtime=1 on the kernel command line) a deferred module that runs
says so on stderr, with its time, so a start-up profile shows what the deferral moved and where.
"""

from __future__ import annotations

import sys
from _thread import RLock
from time import perf_counter_ns as _perf_ns

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; typing is not imported at start
if TYPE_CHECKING:
    from typing import Any

DEFERRED = ("inspect", "traceback", "ssl", "calendar", "mimetypes", "ipaddress", "datetime")
NOT_A_USE = frozenset({"__spec__", "__name__", "__loader__", "__package__", "__class__", "__dict__", "__path__",
                       "__file__", "__cached__"})
_ModuleType = type(sys)  # types.ModuleType without importing types
_lock = RLock()
_running: set[str] = set()  # names whose module runs right now (in the thread holding _lock)


class DeferredModuleError(ImportError):
    """A deferred module cannot be found (at install) or failed to run (at its first use)."""


class DeferredModule(_ModuleType):  # type: ignore[misc,valid-type]
    """A module in sys.modules whose code runs at the first use of one of its attributes."""

    def __getattribute__(self, attr: str) -> Any:
        if attr in NOT_A_USE:  # the import system's own look-ups (an `import` statement) are not a use
            return _ModuleType.__getattribute__(self, attr)
        with _lock:  # reentrant: the module's own code, run below, reads its globals through here
            if type(self) is DeferredModule and self.__name__ not in _running:
                _run(self)
        return _ModuleType.__getattribute__(self, attr)


def _run(module: DeferredModule) -> None:
    name = module.__name__
    spec = module.__spec__
    _running.add(name)
    timed = "importtime" in sys._xoptions
    t0 = _perf_ns() if timed else 0
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        raise DeferredModuleError(f"deferred module {name} failed to load at its first use: "
                                  f"{type(e).__name__}: {e}") from e
    finally:
        _running.discard(name)
    module.__class__ = _ModuleType  # type: ignore[assignment]  # a plain module from now on: no look-up goes through here again
    if timed:
        sys.stderr.write(f"cidboot: deferred module {name} ran at its first use: {(_perf_ns() - t0) // 1000} us\n")


def defer(name: str) -> bool:
    """Put a DeferredModule for top-level stdlib module `name` into sys.modules; False when it is
    imported already. Raises DeferredModuleError when the module cannot be found."""
    if name in sys.modules:
        return False
    spec = None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is not None and (spec := find(name, None)) is not None:
            break
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module") or \
            spec.submodule_search_locations is not None:
        raise DeferredModuleError(f"cannot defer {name}: not a plain module on sys.path")
    module = DeferredModule(name)
    module.__spec__, module.__loader__ = spec, spec.loader
    module.__package__ = spec.parent
    if spec.has_location:
        module.__file__, module.__cached__ = spec.origin, spec.cached
    sys.modules[name] = module
    return True


def install(names: tuple[str, ...] = DEFERRED) -> list[str]:
    """Defer each of `names` not imported yet; returns those deferred."""
    return [n for n in names if defer(n)]


def deferred(name: str) -> bool:
    """True while `name` is a deferred module that has not run yet."""
    return type(sys.modules.get(name)) is DeferredModule
