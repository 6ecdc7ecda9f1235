"""cidboot.stage.deferred: stdlib modules the stages import but do not run at start (inspect, for
dataclasses) run at their first use, exactly once, in the same module object; a module missing
or failing says so loudly; the start paths keep inspect deferred."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from cidboot.stage import deferred

REPO = Path(__file__).resolve().parents[2]


def _fresh(code: str) -> str:
    """Run `code` in a fresh interpreter started as /init starts one (-I -S: no site, whose .pth
    hooks import pathlib and with it ipaddress on a host), from the repo, with the host's
    site-packages after it for the wheels the images carry (cryptography, cbor2)."""
    import site

    paths = [".", *site.getsitepackages()]
    out = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {paths!r}\n" + code],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_dataclasses_with_docstrings_leave_inspect_deferred_and_one_without_runs_it_once() -> None:
    out = _fresh("""
from cidboot.stage import deferred
assert 'inspect' in deferred.install()
import dataclasses
got = [deferred.deferred('inspect'), 'ast' in sys.modules]

@dataclasses.dataclass
class Documented:
    '''Has its own docstring.'''
    x: int

got.append(deferred.deferred('inspect'))
deferred_object = sys.modules['inspect']

@dataclasses.dataclass
class Undocumented:
    x: int

import inspect
got += [deferred.deferred('inspect'), Undocumented.__doc__, type(inspect).__name__,
        inspect is deferred_object is sys.modules['inspect'], str(inspect.signature(Documented)), 'ast' in sys.modules]
print(got)
""")
    assert out == "[True, False, True, False, 'Undocumented(x: int)', 'module', True, '(x: int) -> None', True]"


def test_an_import_statement_is_not_a_use_but_from_import_is() -> None:
    out = _fresh("""
from cidboot.stage import deferred
deferred.install()
import inspect
import inspect as again
a = deferred.deferred('inspect')
from inspect import signature
print([a, deferred.deferred('inspect'), callable(signature)])
""")
    assert out == "[True, False, True]"


def test_a_module_already_imported_is_left_alone_and_a_missing_one_is_refused() -> None:
    assert deferred.defer("sys") is False  # always imported: nothing to defer
    with pytest.raises(deferred.DeferredModuleError, match="cannot defer cidboot_no_such_module"):
        deferred.defer("cidboot_no_such_module")
    assert "cidboot_no_such_module" not in sys.modules


def test_a_deferred_module_that_fails_raises_at_every_use(tmp_path: Path) -> None:
    (tmp_path / "cidboot_broken_mod.py").write_text("raise RuntimeError('broken on purpose')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert deferred.defer("cidboot_broken_mod")
        mod = sys.modules["cidboot_broken_mod"]
        for _ in range(2):
            with pytest.raises(deferred.DeferredModuleError, match="failed to load at its first use: RuntimeError"):
                mod.anything  # noqa: B018
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cidboot_broken_mod", None)


def test_threads_using_it_at_once_all_see_the_whole_module(tmp_path: Path) -> None:
    (tmp_path / "cidboot_slow_mod.py").write_text("import time\nRUNS = []\ntime.sleep(0.2)\nRUNS.append(1)\nVALUE = 42\n")
    sys.path.insert(0, str(tmp_path))
    try:
        deferred.defer("cidboot_slow_mod")
        mod = sys.modules["cidboot_slow_mod"]
        seen: list[Any] = []
        threads = [threading.Thread(target=lambda: seen.append((mod.VALUE, len(mod.RUNS)))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == [(42, 1)] * 4
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cidboot_slow_mod", None)


# dataclasses on the start paths without a docstring of their own, in modules other helpers own
# this session: each loads inspect at start (dataclasses makes its docstring with
# inspect.signature) until it gets one. The list may only shrink.
# each stage's entry and what it imports on its way to its job (measure, hand over, serve)
START_PATHS = {
    "firmware": ("firmware.stage", *("cidboot.stage.switch_root", "cidboot.trust.measure"), "cidboot.trust.dice"),
    "bootstrap": ("bootstrap.stage.main", "bootstrap.stage.verify", "cidboot.stage.switch_root",
                  "cidboot.store.blockstore", "cidboot.netboot.dhcp_client"),
    "agent": ("agent.device",),
}


@pytest.mark.parametrize("stage", sorted(START_PATHS))
def test_start_path_dataclasses_have_docstrings(stage: str) -> None:
    """Every dataclass a stage creates on its way has its own docstring, else inspect runs at start
    (the stage is imported as /init does it: pid1 installs the deferral first)."""
    out = _fresh(f"""
import json
from cidboot.stage import deferred
deferred.install()
import dataclasses
undocumented = []
process = dataclasses._process_class
def spy(cls, *a, **k):
    if not cls.__dict__.get('__doc__'):
        undocumented.append(cls.__module__ + '.' + cls.__qualname__)
    return process(cls, *a, **k)
dataclasses._process_class = spy
for m in {START_PATHS[stage]!r}:
    __import__(m)
print(json.dumps([undocumented, [n for n in deferred.DEFERRED if not deferred.deferred(n)]]))
""")
    undocumented, ran = json.loads(out.splitlines()[-1])
    assert undocumented == [], "document these dataclasses (cidboot.stage.deferred)"
    assert ran == [], "the start path uses these: take them off DEFERRED or find who uses them"


def test_a_profiled_start_says_when_a_deferred_module_runs() -> None:
    out = subprocess.run([sys.executable, "-I", "-X", "importtime", "-c",
                          "import sys; sys.path.insert(0, '.')\nfrom cidboot.stage import deferred\n"
                          "deferred.defer('colorsys')\nimport colorsys\ncolorsys.rgb_to_hsv"],
                         capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    assert "cidboot: deferred module colorsys ran at its first use: " in out.stderr
