"""What a stage image carries: the import closure of its own entry, nothing else of the project
(its stdlib and wheel modules come from the shared runtime layer, the platform closure: below).

The closure is computed as `imagebuilder build` does (imagebuilder.build.stage_entries through
imagebuilder.pyimports.analyse), here over the project tree alone: stdlib and wheel names stay
unresolved, which is all these checks need (no download). Host-side code (the boot server, the
CLIs, Kubo's client, the image builder) must not be in any stage image: it was, when the images
shipped every module of their component. And every shipped module carries bytecode the target
interpreter loads without reading the source: unchecked-hash .pyc (PEP 552).
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuilder import build, initramfs, pycompile, pyimports

REPO = Path(__file__).resolve().parents[2]
OPS = {"firmware": REPO / "firmware" / "image", "bootstrap": REPO / "bootstrap" / "image",
       "image": REPO / "examples" / "hello"}
NEEDS = {
    "firmware": ["cidboot.stage.pid1", "firmware.stage", "firmware.netboot", "cidboot.netboot.dhcp_client",
                 "cidboot.netboot.tftp_client", "cidboot.stage.kexec", "cidboot.trust.dice", "cidboot.trust.measure",
                 "cidboot.stage.handoff"],
    "bootstrap": ["cidboot.stage.pid1", "bootstrap.stage.main", "bootstrap.stage.verify", "bootstrap.stage.nvram",
                  "cidboot.store.gateway.client", "cidboot.store.blockstore", "cidboot.trust.manifest",
                  "cidboot.stage.kexec", "cidboot.netboot.dhcp_client", "cidboot.trust.dice"],
    "image": ["cidboot.stage.pid1", "agent.device", "agent.attestation_api", "agent.orchestrator", "agent.peers",
              "cidboot.httpd", "cidboot.stage.handoff", "cidboot.dataflow.checks", "ops"],
}
HOST_SIDE = ["bootstrap.server", "bootstrap.cli", "bootstrap.commands", "bootstrap.__main__", "firmware.cli",
             "firmware.commands", "firmware.__main__", "agent.cli", "agent.commands", "agent.__main__",
             "cidboot.cli", "cidboot.store.kubo", "imagebuilder", "qemu", "bench", "tests", "examples.demo",
             "scapy", "tftpy", "pyroute2", "ipfshttpclient", "yaml", "elftools"]


def closure(target: str) -> pyimports.ImportGraph:
    return pyimports.analyse(build.stage_entries(target, ["ops"]), [REPO, OPS[target]], exclude=build.HOST_ONLY)


@pytest.mark.parametrize("target", sorted(build.ENTRY))
def test_stage_image_closure_has_its_entry_and_what_it_needs(target: str) -> None:
    g = closure(target)
    assert build.ENTRY[target] in g.modules
    missing = [m for m in NEEDS[target] if m not in g.modules]
    assert not missing, f"{target}: the closure lacks {missing}"


@pytest.mark.parametrize("target", sorted(build.ENTRY))
def test_stage_image_ships_no_host_side_code(target: str) -> None:
    """The bootstrap image carried bootstrap/server, the CLIs and their dependencies when an image
    shipped every module of its component; now only what the stage entry imports."""
    g = closure(target)
    found = sorted(n for n in [*g.modules, *g.unresolved]
                   if any(n == h or n.startswith(h + ".") for h in HOST_SIDE))
    assert not found, f"{target} image would carry host-side modules: {found}"


def test_entries_are_the_stage_mains_not_the_cli_packages() -> None:
    """/init calls the entry's main() (cidboot.stage.pid1.run_stage): each entry has one, and none
    is a package __main__ (whose CLI branch would pull the CLI into the image)."""
    for target, entry in build.ENTRY.items():
        assert not entry.endswith("__main__") and "." in entry, target
        tree = (REPO / Path(*entry.split("."))).with_suffix(".py").read_text()
        assert "\ndef main(" in tree, f"{entry} has no main()"


def test_init_calls_the_entry_and_offers_the_importtime_knob() -> None:
    init = initramfs.init_entries("bootstrap.stage.main")[0]
    text = init.data.decode()
    assert init.path == "init" and text.startswith(f"#!{initramfs.PYTHON} -IS\n")
    assert "run_stage('bootstrap.stage.main')" in text
    assert f"b'{initramfs.IMPORTTIME_ENV}') == b'1'" in text and "'-X', 'importtime'" in text
    assert "." not in initramfs.IMPORTTIME_ENV  # dotted parameters never reach init's environment
    compile(text, "init", "exec")


def test_every_shipped_module_has_unchecked_hash_bytecode() -> None:
    """python_entries pairs each source with its .pyc in __pycache__, hash-based and unchecked
    (flags == 0b01): the interpreter neither compiles at boot nor stats the source."""
    if importlib.util.MAGIC_NUMBER != pycompile.TARGET_MAGIC:
        pytest.skip("host Python is not 3.11: it cannot compile the target's bytecode")
    files = {"opt/cidboot/cidboot/errors.py": (REPO / "cidboot/errors.py").read_bytes(),
             "usr/lib/python3.11/fake.py": b"X = 1\n"}
    entries = {e.path: e.data for e in initramfs.python_entries(files)}
    for src in files:
        pyc = entries[pycompile.pyc_path(src)]
        assert pyc[:4] == pycompile.TARGET_MAGIC
        assert struct.unpack("<I", pyc[4:8])[0] == 0b01, f"{src}: not unchecked-hash bytecode"
        assert pyc[8:16] == importlib.util.source_hash(files[src])


def test_sourceless_bytecode_is_the_same_bytes_where_the_interpreter_loads_it_without_a_source(
        tmp_path: Path) -> None:
    """Without sources (the runtime layer; project code unless image.python.sources) each module is
    its bytecode alone at mod.pyc, the same bytes as __pycache__/ would hold, and the interpreter
    imports it from there (it reads __pycache__/ only beside a .py)."""
    if importlib.util.MAGIC_NUMBER != pycompile.TARGET_MAGIC:
        pytest.skip("host Python is not 3.11: it cannot compile the target's bytecode")
    files = {"pkg/__init__.py": b"from pkg.mod import VALUE\n", "pkg/mod.py": b'"""doc"""\nVALUE = 42\n'}
    with_src = {e.path: e.data for e in initramfs.python_entries(files)}
    without = {e.path: e.data for e in initramfs.python_entries(files, sources=False)}
    assert set(without) == {"pkg/__init__.pyc", "pkg/mod.pyc"}
    assert without["pkg/mod.pyc"] == with_src[pycompile.pyc_path("pkg/mod.py")]
    for path, data in without.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                           "import pkg, pkg.mod; print(pkg.VALUE, pkg.mod.__doc__, pkg.mod.__file__.endswith('pkg/mod.pyc'))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["42", "doc", "True"], proc.stderr


def test_runtime_bytecode_has_no_docstrings_but_keeps_asserts_and_line_numbers(tmp_path: Path) -> None:
    """The runtime layer's modules (stdlib, packages) are compiled without docstrings: `__doc__`
    None in the module, its classes and functions (a body that was only a docstring still runs),
    asserts still raise (not -OO's optimize=2), a traceback names the source's line, and the
    header is the same unchecked-hash one, with the hash of the source as shipped."""
    if importlib.util.MAGIC_NUMBER != pycompile.TARGET_MAGIC:
        pytest.skip("host Python is not 3.11: it cannot compile the target's bytecode")
    src = (b'"""module doc"""\nfrom __future__ import annotations\nclass C:\n    """class doc"""\n'
           b'def only_doc():\n    """just a docstring"""\nasync def a():\n    "doc"\n    return 1\n'
           b'def fails(x: int):\n    """doc"""\n    assert x, "assert kept"\n')
    kept = initramfs.python_entries({"m.py": src}, sources=False)[0].data
    (stripped,) = initramfs.python_entries({"m.py": src}, sources=False, docstrings=False)
    assert stripped.path == "m.pyc" and stripped.data[:16] == kept[:16] and len(stripped.data) < len(kept)
    (tmp_path / "m.pyc").write_bytes(stripped.data)
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                           "import m, traceback\n"
                           "print(m.__doc__, m.C.__doc__, m.only_doc.__doc__, m.a.__doc__, m.only_doc(), m.fails.__annotations__)\n"
                           "try: m.fails(0)\n"
                           "except AssertionError as e: print(e, traceback.extract_tb(e.__traceback__)[-1].lineno)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["None None None None None {'x': 'int'}", "assert kept 12"], proc.stderr


def test_platform_closure_is_the_union_of_the_stage_closures() -> None:
    """The shared runtime layer carries the stdlib and wheel modules of the platform closure
    (imagebuilder.build.PLATFORM_ENTRIES): every stage's own closure (without its operations) is
    inside it, so no stage needs a stdlib or wheel module the runtime lacks; and it carries no
    host-side code either."""
    platform = pyimports.analyse(build.PLATFORM_ENTRIES, [REPO], build.PLATFORM_MODULES, build.HOST_ONLY)
    for target in build.ENTRY:
        own = pyimports.analyse(build.stage_entries(target, []), [REPO], exclude=build.HOST_ONLY)
        assert set(own.modules) <= set(platform.modules), target
        assert own.unresolved <= platform.unresolved, f"{target}: {sorted(own.unresolved - platform.unresolved)}"
    found = sorted(n for n in [*platform.modules, *platform.unresolved]
                   if any(n == h or n.startswith(h + ".") for h in HOST_SIDE))
    assert not found, f"the platform runtime would carry host-side modules: {found}"
    assert {"_cffi_backend", "encodings.idna"} <= platform.unresolved  # names looked up at run time


def test_the_app_layer_ships_the_projects_modules_not_a_flow_kept_inside_the_checkout(tmp_path: Path) -> None:
    """A flow under the project's root (make demo builds under out/, examples/ sit in the
    checkout) must not put its operations into the app layer: the layer, and its CID, would
    then depend on where the flow file lies. Its operations go to the operations layer."""
    root = tmp_path / "repo"
    for rel in ("cidboot/__init__.py", "cidboot/stage.py", "out/demo/work/workload/ops.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("X = 1\n")
    flow_dir = root / "out/demo/work/workload"
    graph = pyimports.ImportGraph(modules={"cidboot": root / "cidboot/__init__.py", "cidboot.stage": root / "cidboot/stage.py",
                                           "ops": flow_dir / "ops.py"})
    app = [e.path for e in initramfs.code_entries(graph, root, initramfs.APP, sources=True)]
    assert sorted(p for p in app if p.endswith(".py")) == [f"{initramfs.APP}/cidboot/__init__.py",
                                                           f"{initramfs.APP}/cidboot/stage.py"]
    ops = [e.path for e in initramfs.code_entries(graph, flow_dir, initramfs.OPS, sources=True)]
    assert [p for p in ops if p.endswith(".py")] == [f"{initramfs.OPS}/ops.py"]


def test_pure_python_twins_are_left_out_only_beside_their_c_module(tmp_path: Path) -> None:
    """decimal falls back to _pydecimal only when _decimal does not import, abc to _py_abc only
    without the built-in _abc: the twin is not followed when its C module is in the roots (or
    built in), and is, as any import, when it is not."""
    std = tmp_path / "std"
    (std / "lib-dynload").mkdir(parents=True)
    (std / "decimal.py").write_text("try:\n    from _decimal import *\nexcept ImportError:\n    from _pydecimal import *\n")
    (std / "_pydecimal.py").write_text("import numbers\n")
    (std / "numbers.py").write_text("")
    (std / "abc.py").write_text("try:\n    from _abc import get_cache_token\nexcept ImportError:\n    from _py_abc import ABCMeta\n")
    (std / "_py_abc.py").write_text("")
    roots = [std, std / "lib-dynload"]
    without = pyimports.analyse(["decimal", "abc"], roots)
    assert "_pydecimal" in without.modules and "_py_abc" not in without.modules
    (std / "lib-dynload/_decimal.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    with_c = pyimports.analyse(["decimal", "abc"], roots)
    assert "_decimal" in with_c.modules and "decimal" in with_c.modules
    assert {"_pydecimal", "_py_abc"} <= with_c.excluded and "numbers" not in with_c.modules
