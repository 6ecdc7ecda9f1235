"""One runtime layer per arch, shared byte for byte by every stage flow (docs/images.md).

The runtime layer holds the interpreter, the shared libraries and the stdlib + wheel modules of the
union of the platform entries' closures (imagebuilder.build.PLATFORM_ENTRIES), nothing of a stage
or a flow: kernel modules go to the agent layer, modules only a flow's operations import to the
operations layer. The config layer's /etc/cidboot/runtime.json names the runtime layer (CID, size,
hashes, paths in archive order), so a same-kernel hand-over can keep the running one.

The builds here are the real `imagebuilder.build.build` over the real flows (firmware, bootstrap,
hello), with the downloads replaced: a small staged tree (a gcc-built `python3.11` linked to the
host's libc, a few stdlib modules, one extension module), fake wheels, fake kernel modules.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cidboot.trust import keys
from imagebuilder import build, flowfile, initramfs, pycompile
from imagebuilder.cpio import Entry, archive_bytes, compress, decompress, iter_newc, read_newc
from imagebuilder.layers import layer_cid
from imagebuilder.lock import Lock, lock_path

REPO = Path(__file__).resolve().parents[2]
STAGE_FLOWS = {
    "amd64": ["firmware/image/flow.yaml", "bootstrap/image/flow.yaml", "examples/hello/flow.yaml",
              "examples/two-device/flow.yaml"],
    "arm64": ["bootstrap/image/flow-arm64.yaml", "examples/hello/flow-arm64.yaml",
              "examples/two-device/flow-arm64.yaml"],
}
TRIPLET = "x86_64-linux-gnu"


@pytest.mark.parametrize("arch", sorted(STAGE_FLOWS))
def test_committed_stage_flows_of_an_arch_pin_one_runtime(arch: str) -> None:
    """The runtime layer's bytes follow from the runtime pins (and the platform's code): every stage
    flow of an arch must pin the same .debs and wheels, or each would ship its own runtime (the
    firmware and hello flows pinned pyelftools, which no guest code imports, the bootstrap did not)."""
    pins = {}
    for rel in STAGE_FLOWS[arch]:
        path = REPO / rel
        ff = flowfile.parse(path.read_text(), path)
        pins[rel] = build.runtime_pins(ff, Lock.load(lock_path(path)))
    first = pins[STAGE_FLOWS[arch][0]]
    assert first["arch"] == arch and first["debs"] and first["wheels"]
    differ = [rel for rel, p in pins.items() if p != first]
    assert not differ, f"{differ} pin another runtime than {STAGE_FLOWS[arch][0]}"


def test_platform_is_pid1_and_every_stage_entry() -> None:
    assert set(build.PLATFORM_ENTRIES) == {"cidboot.stage.pid1", *build.ENTRY.values()}
    assert len(build.PLATFORM_ENTRIES) == len(set(build.PLATFORM_ENTRIES))


def test_a_later_layer_may_not_repeat_a_runtime_member() -> None:
    rt = compress(archive_bytes([Entry.file("usr/bin/python3.11", b"elf"), Entry.directory("opt/cidboot/lib")]),
                  "gzip")
    same_dir = compress(archive_bytes([Entry.file("opt/cidboot/cidboot/x.py", b"")]), "gzip")
    build.check_layer_paths(rt, {"agent": same_dir})  # opt, opt/cidboot again: mkdir of what exists
    for bad, what in (([Entry.file("usr/bin/python3.11", b"other")], "usr/bin/python3.11"),
                      ([Entry.directory("opt/cidboot/lib", 0o700)], "opt/cidboot/lib"),
                      ([Entry.symlink("usr/bin/python3.11", "x")], "usr/bin/python3.11")):
        with pytest.raises(build.BuildError, match=f"the agent layer repeats the runtime layer's '{what}'"):
            build.check_layer_paths(rt, {"agent": compress(archive_bytes(bad), "gzip")})


def test_runtime_json_names_the_layer_and_its_paths_in_archive_order() -> None:
    rt = compress(archive_bytes([Entry.file("usr/lib/python3.11/os.py", b"x"), Entry.file("usr/bin/python3.11", b"e")]),
                  "gzip")
    doc = json.loads(build.runtime_json(rt))
    assert list(doc) == sorted(doc) == ["cid", "paths", "sha256", "sha512", "size"]
    assert doc["cid"] == str(layer_cid(rt)) and doc["size"] == len(rt)
    assert doc["sha256"] == hashlib.sha256(rt).hexdigest() and doc["sha512"] == hashlib.sha512(rt).hexdigest()
    assert doc["paths"] == ["usr", "usr/bin", "usr/bin/python3.11", "usr/lib", "usr/lib/python3.11",
                            "usr/lib/python3.11/os.py"]


# -- real builds over a staged tree made here --------------------------------------------------


def _gcc(args: list[str]) -> None:
    subprocess.run(["gcc", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def sysroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's layout in miniature: /usr/bin/python3.11 (a gcc-built program needing libc),
    libc and the loader in /lib/<triplet> with /lib64's loader link, a stdlib of a few modules and
    one extension module that only the hello copy's operation imports."""
    if shutil.which("gcc") is None or not Path(f"/lib/{TRIPLET}/libc.so.6").exists():
        pytest.skip("needs gcc and an x86_64 glibc")
    root = tmp_path_factory.mktemp("sysroot")
    src = root.parent / "src"
    src.mkdir(exist_ok=True)
    (src / "main.c").write_text("int main(void){return 0;}\n")
    (src / "ext.c").write_text("int PyInit__fakeext(void){return 0;}\n")
    (root / "usr/bin").mkdir(parents=True)
    _gcc(["-o", str(root / "usr/bin/python3.11"), str(src / "main.c")])
    libdir = root / "lib" / TRIPLET
    libdir.mkdir(parents=True)
    for name in ("libc.so.6", "ld-linux-x86-64.so.2"):
        shutil.copy(Path(f"/lib/{TRIPLET}") / name, libdir / name)
    (root / "lib64").mkdir()
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to(f"/lib/{TRIPLET}/ld-linux-x86-64.so.2")
    std = root / initramfs.STDLIB
    (std / "json").mkdir(parents=True)
    (std / "lib-dynload").mkdir()
    (std / "os.py").write_text("import stat\n")
    (std / "stat.py").write_text("X = 1\n")
    (std / "json/__init__.py").write_text("from json import decoder\n")
    (std / "json/decoder.py").write_text("Y = 2\n")
    (std / "fakeonly.py").write_text("import os\n")  # only the hello copy's operation imports it
    _gcc(["-shared", "-fPIC", "-o", str(std / "lib-dynload" / f"_fakeext.cpython-311-{TRIPLET}.so"),
          str(src / "ext.c")])
    # Debian's python3-* packages (python3-cryptography, python3-cffi-backend in flow-small.yaml; fakes
    # only the hello copy's operation imports, not names the build host's cryptography imports when
    # the dataclass recorder runs)
    dist = root / initramfs.DIST_PACKAGES
    dist.mkdir(parents=True)
    (dist / "fakedist.py").write_text("import json.decoder\n")
    (src / "distext.c").write_text("int PyInit__fakedistext(void){return 0;}\n")
    _gcc(["-shared", "-fPIC", "-o", str(dist / f"_fakedistext.cpython-311-{TRIPLET}.so"), str(src / "distext.c")])
    return root


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in ("cbor2", "cryptography", "cffi"):  # the stage flows' wheels
        root = tmp_path_factory.mktemp(f"wheel-{name}")
        (root / name).mkdir()
        (root / name / "__init__.py").write_text("import json\n")
        out[name] = root
    return out


def _flow(src: str, dest: Path) -> Path:
    shutil.copytree(REPO / src, dest, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    keys.write_keypair(keys.generate(), dest / "keys/signer-1")
    (dest / "trust-anchor.json").write_text("{}\n")
    return dest / "flow.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, sysroot: Path,
          wheels: dict[str, Path]) -> dict[str, build.BuildResult]:
    """firmware, bootstrap and hello built with separate layer caches (no layer is shared by a
    cache hit: equal runtime bytes must come from equal inputs)."""
    if importlib.util.MAGIC_NUMBER != pycompile.TARGET_MAGIC:
        pytest.skip("host Python is not 3.11: it cannot compile the target's bytecode")
    tmp = tmp_path_factory.mktemp("flows")
    flows = {"firmware": _flow("firmware/image", tmp / "firmware"),
             "bootstrap": _flow("bootstrap/image", tmp / "bootstrap"),
             "hello": _flow("examples/hello", tmp / "hello")}
    ops = flows["hello"].parent / "ops.py"
    ops.write_text(ops.read_text() + "\nimport fakeonly  # noqa\nimport _fakeext  # noqa\nimport json.decoder  # noqa\n"
                   "import fakedist  # noqa\nimport _fakedistext  # noqa\n")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(build, "fetch_deb", lambda pin, hint: tmp / f"{pin.name}.deb")
        mp.setattr(build, "_kernel_from_deb", lambda deb: b"a kernel\n")
        mp.setattr(build, "_module_entries", lambda deb, names: [
            initramfs.Entry.file(f"lib/modules/{n}.ko", n.encode()) for n in sorted(names)]
            + [initramfs.Entry.file("etc/cidboot/modules", "\n".join(sorted(names)).encode() + b"\n")])
        mp.setattr(build, "fetch_wheel", lambda pin, hint, arch: Path(pin.name))
        mp.setattr(initramfs, "stage_sysroot", lambda debs, base: sysroot)
        mp.setattr(initramfs, "unpack_wheel", lambda whl, base: wheels[whl.name])
        # the fake wheels are placeholders the dataclass recorder cannot import (no
        # cryptography.exceptions...): record with the build host's packages, as for an image of
        # another arch (the image's own packages first: test_dccache)
        mp.setattr(build, "host_arch", lambda: "not-the-flows-arch")
        return {name: build.build(flow, cache_root=tmp / f"cache-{name}") for name, flow in flows.items()}
    finally:
        mp.undo()


def _layers(res: build.BuildResult) -> dict[str, bytes]:
    return {lyr.role: lyr.data for lyr in res.layers}


def _members(layer: bytes) -> dict[str, tuple[int, bytes]]:
    return {m.path: (m.mode, data) for m, data in iter_newc(decompress(layer))}


def test_stage_flows_build_one_runtime_layer(built: dict[str, build.BuildResult]) -> None:
    runtimes = {name: _layers(res)["runtime"] for name, res in built.items()}
    assert len(set(runtimes.values())) == 1, "the stages' runtime layers differ"
    cids = {name: next(lyr.cid for lyr in res.manifest.layers if lyr.role == "runtime") for name, res in built.items()}
    assert len(set(cids.values())) == 1
    assert not any(lyr.cached for res in built.values() for lyr in res.layers)


def test_runtime_holds_the_platform_runtime_only(built: dict[str, build.BuildResult]) -> None:
    rt = _members(_layers(built["firmware"])["runtime"])
    for want in ("usr/bin/python3.11", f"lib/{TRIPLET}/libc.so.6", "lib64/ld-linux-x86-64.so.2",
                 "usr/lib/python3.11/os.pyc", "usr/lib/python3.11/json/decoder.pyc",
                 "opt/cidboot/lib/cbor2/__init__.pyc"):
        assert want in rt, want
    files = [p for p, (mode, _) in rt.items() if not stat.S_ISDIR(mode)]
    # stdlib and wheel modules as bytecode alone, where the import system loads it without a source
    assert not [p for p in files if p.endswith(".py") or "__pycache__" in p], "sources or __pycache__ in the runtime"
    assert rt["usr/lib/python3.11/os.pyc"][1][:4] == pycompile.TARGET_MAGIC
    assert not [p for p in files if not p.startswith(("usr/", "lib/", "lib64/", "opt/cidboot/lib/"))]
    assert not [p for p in rt if p.startswith(("lib/modules", "etc"))], "kernel modules or config in the runtime"
    assert not [p for p in rt if "fakeonly" in p or "_fakeext" in p], "an operation's import in the runtime"


def test_kernel_modules_in_the_agent_layer_and_ops_imports_in_the_operations_layer(
        built: dict[str, build.BuildResult]) -> None:
    for name, mods in (("firmware", "qemu_fw_cfg"), ("bootstrap", "virtio_blk"), ("hello", "virtio_net")):
        agent = _members(_layers(built[name])["agent"])
        assert f"lib/modules/{mods}.ko" in agent and "etc/cidboot/modules" in agent, name
        assert "init" in agent and "opt/cidboot/cidboot/stage/pid1.pyc" in agent
        assert not [p for p in agent if p.endswith(".py") or "__pycache__" in p], "project sources shipped"
    ops = _members(_layers(built["hello"])["operations"])
    assert {"usr/lib/python3.11/fakeonly.pyc", f"usr/lib/python3.11/lib-dynload/_fakeext.cpython-311-{TRIPLET}.so",
            "opt/cidboot/ops/ops.py", "opt/cidboot/ops/__pycache__/ops.cpython-311.pyc"} <= set(ops)
    # Debian's dist-packages ship as the wheels do, under /opt/cidboot/lib (on the stage's sys.path)
    assert {"opt/cidboot/lib/fakedist.pyc", f"opt/cidboot/lib/_fakedistext.cpython-311-{TRIPLET}.so"} <= set(ops)
    assert not [p for p in ops if p.startswith("usr/lib/python3/")]
    # the runtime has them (as sourceless bytecode: the operations layer must not add their sources either)
    assert not [p for p in ops if p.startswith(("usr/lib/python3.11/os.", "usr/lib/python3.11/json"))]
    assert f"lib/{TRIPLET}/libc.so.6" not in ops
    assert not [p for p in _members(_layers(built["firmware"])["operations"]) if p.startswith("usr")]


def test_the_runtime_layer_follows_the_flows_compression_unless_it_names_its_own(tmp_path: Path) -> None:
    """image.python.runtime.compression sets the runtime layer's alone (and is part of what makes
    it one per arch); without it, the runtime layer is compressed as the others."""
    path = REPO / "bootstrap/image/flow.yaml"
    own = path.read_text()
    line = next(x for x in own.splitlines(keepends=True) if x.startswith("      compression: zstd"))
    text = own.replace(line, "", 1)
    ff = flowfile.parse(text, path)
    assert build.runtime_compression(ff) == ff.data["image"]["compression"] == "gzip"
    ff2 = flowfile.parse(own, path)  # the stage flows name zstd for the runtime alone
    assert build.runtime_compression(ff2) == "zstd"
    lock = Lock.load(lock_path(path))
    assert build.runtime_pins(ff2, lock) != build.runtime_pins(ff, lock)
    assert build.runtime_pins(ff2, lock)["compression"] == "zstd"


def test_runtime_json_in_the_config_layer_matches_the_runtime_layer(built: dict[str, build.BuildResult]) -> None:
    for name, res in built.items():
        layers = _layers(res)
        rt = layers["runtime"]
        cfg = _members(layers["config"])
        mode, raw = cfg[build.RUNTIME_JSON_PATH]
        doc = json.loads(raw)
        assert raw == json.dumps(doc, sort_keys=True).encode() + b"\n"
        assert doc["cid"] == str(next(lyr.cid for lyr in res.manifest.layers if lyr.role == "runtime"))
        assert doc["size"] == len(rt) == next(lyr.size for lyr in res.manifest.layers if lyr.role == "runtime")
        assert doc["sha256"] == hashlib.sha256(rt).hexdigest() and doc["sha512"] == hashlib.sha512(rt).hexdigest()
        assert doc["paths"] == [m.path for m in read_newc(decompress(rt))]
        # and no later layer repeats a runtime member other than a directory
        files = {p for p, (mode, _) in _members(rt).items() if not stat.S_ISDIR(mode)}
        for role in ("agent", "operations", "config"):
            assert not files & set(_members(layers[role])), (name, role)


def test_a_bootstrap_the_boot_server_could_not_split_is_refused_at_build_time() -> None:
    """The bootstrap's reference value is measured over two initrds (runtime, rest); the boot
    server cuts with runtime_prefix, which reads the layers after the runtime in Python. A zstd
    runtime passes (its end is read from the frame headers); zstd after it fails the build."""
    import gzip
    import os

    path = REPO / "bootstrap/image/flow.yaml"
    ff = flowfile.parse(path.read_text(), path)
    runtime = compress(archive_bytes([Entry.file("usr/bin/python3.11", os.urandom(5000))], 0), "zstd")
    rt_json = build.runtime_json(runtime)
    rest = archive_bytes([Entry.file(build.RUNTIME_JSON_PATH, rt_json)], 0)
    build._check_served_split(ff, [runtime, gzip.compress(rest, mtime=0)])
    with pytest.raises(build.BuildError, match="could not split this bootstrap's initrd after its runtime layer"):
        build._check_served_split(ff, [runtime, compress(rest, "zstd")])


def test_a_library_a_module_dlopens_comes_with_it_or_the_build_fails(sysroot: Path, tmp_path: Path) -> None:
    """Debian's cryptography 38 loads OpenSSL's legacy provider (ossl-modules/legacy.so) when its
    bindings initialise, by path: no import and no DT_NEEDED names it. The runtime carries it
    (with what it links) wherever the bindings are shipped; a runtime whose packages lack it is
    refused at build time, not found missing at boot."""
    from imagebuilder import elfdeps, pyimports

    root = tmp_path / "sysroot"
    shutil.copytree(sysroot, root, symlinks=True)
    dist = root / initramfs.DIST_PACKAGES
    bindings = dist / "cryptography/hazmat/bindings"
    bindings.mkdir(parents=True)
    (tmp_path / "b.c").write_text("int PyInit__openssl(void){return 0;}\n")
    _gcc(["-shared", "-fPIC", "-o", str(bindings / "_openssl.abi3.so"), str(tmp_path / "b.c")])
    legacy = root / f"usr/lib/{TRIPLET}/ossl-modules/legacy.so"
    legacy.parent.mkdir(parents=True)
    (tmp_path / "l.c").write_text("int OSSL_provider_init(void){return 0;}\n")
    _gcc(["-shared", "-fPIC", "-o", str(legacy), str(tmp_path / "l.c")])
    graph = pyimports.ImportGraph(modules={"os": root / initramfs.STDLIB / "os.py",
                                           "cryptography.hazmat.bindings._openssl": bindings / "_openssl.abi3.so"})
    got = {e.path for e in initramfs.runtime_entries(root, graph, "amd64", wheel_roots=[dist])}
    assert {f"usr/lib/{TRIPLET}/ossl-modules/legacy.so", "opt/cidboot/lib/cryptography/hazmat/bindings/_openssl.abi3.so",
            f"lib/{TRIPLET}/libc.so.6"} <= got
    del graph.modules["cryptography.hazmat.bindings._openssl"]
    assert not [p for p in initramfs.runtime_entries(root, graph, "amd64", wheel_roots=[dist]) if "ossl" in p.path]
    graph.modules["cryptography.hazmat.bindings._openssl"] = bindings / "_openssl.abi3.so"
    legacy.unlink()
    with pytest.raises(elfdeps.MissingLibraryError, match="ossl-modules/legacy.so"):
        initramfs.runtime_entries(root, graph, "amd64", wheel_roots=[dist])
