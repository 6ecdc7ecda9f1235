"""Python start-up of each stage image (firmware, bootstrap, hello image) under QEMU TCG.

Each image's kernel + initramfs is booted directly (-kernel/-initrd, its manifest's command
line, no NIC, no DICE engine, no hand-off): every stage then starts exactly as in a real boot
(PID-1 set-up, imports, first console line) and refuses or fails soon after, for want of a
network or a hand-off, and powers off. Three boots per stage:

- as built (the manifest's cmdline, `quiet`): power-on -> the stage's first console line;
- without `quiet`: when the kernel starts (`Linux version`) and when it runs /init, so the
  first line can be split into kernel and Python;
- with `cidboot_importtime=1` (imagebuilder.initramfs.init_entries): /init re-runs itself under
  `-X importtime`; the console then carries every import's self and cumulative microseconds.

The test asserts what a stage must not import at start (host-side code, the CLIs); the module
also runs as a script to print the figures (docs/images.md, "Start-up"):

    python3 -m tests.e2e.test_startup_qemu --work /tmp/startup --json out/startup.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "flow.yaml"
# a stage's own first console line: its start marker, or its refusal / fatal error when it stops earlier
FIRST_LINE = re.compile(r"cidboot-stage: |cidboot: (refused|fatal): |cidboot: (firmware|bootstrap|agent): ")
DCCODE_RX = re.compile(r"cidboot: dataclass code: hits=(\d+) misses=(\d+)")
IMPORT_RX = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
# never imported by a booting stage: host tools, servers, CLIs
HOST_SIDE = ("imagebuilder", "qemu", "bootstrap.server", "bootstrap.cli", "bootstrap.commands", "firmware.cli",
             "agent.cli", "agent.commands", "cidboot.store.kubo", "cidboot.cli", "argparse", "yaml")
STAGES = ("firmware", "bootstrap", "image")


@dataclass
class StartupFigures:
    stage: str
    initrd_bytes: int
    first_line: str = ""
    to_first_line_s: float = 0.0  # power-on -> the stage's first console line (cmdline as built)
    kernel_start_s: float | None = None  # power-on -> `Linux version` (verbose boot)
    init_start_s: float | None = None  # power-on -> `Run /init` (verbose boot)
    verbose_to_first_line_s: float | None = None
    imports_to_first_line_us: int = 0  # sum of top-level cumulative import times before the first line
    imports_total_us: int = 0  # the same over the whole run (the stage goes on until it stops)
    modules_to_first_line: int = 0
    top: list[tuple[str, int]] = field(default_factory=list)  # (module, cumulative us), top-level imports
    imported: list[str] = field(default_factory=list)  # every module imported before the first line
    dataclass_code: tuple[int, int] | None = None  # (hits, misses) of the table on the start path (cidboot.stage.dccache)


def parse_importtime(lines: list[str]) -> tuple[int, list[tuple[str, int]], list[str]]:
    """(sum of top-level cumulative us, top-level (module, cumulative us) by cost, all module names)."""
    total, top, names = 0, [], []
    for text in lines:
        m = IMPORT_RX.search(text)
        if not m:
            continue
        names.append(m[4])
        if len(m[3]) == 1:  # "| name": a top-level import (nested ones are indented two spaces per level)
            total += int(m[2])
            top.append((m[4], int(m[2])))
    return total, sorted(top, key=lambda x: -x[1]), names


def boot_once(name: str, kernel: Path, initrd: Path, append: str, work: Path, timeout: float = 300,
              icount: int | None = None) -> list[Any]:
    """Boot until power-off; the console lines (t since power-on, text). `icount`: the guest's
    clock counts instructions (qemu.harness.vm.GuestSpec.icount)."""
    from qemu.harness.vm import Guest, GuestError

    for attempt in range(2):  # QMP can refuse the first connection on a loaded host: one more power-on
        state = work / name
        shutil.rmtree(state, ignore_errors=True)
        g = Guest.create(name, state, kernel=kernel, initrd=initrd, append=append, memory_mib=1024, icount=icount)
        try:
            g.start()
        except Exception:
            with contextlib.suppress(Exception):
                g.stop()
            if g.running:
                g.kill()
            if attempt:
                raise
            continue
        try:
            with contextlib.suppress(GuestError):  # a stage that never powers off: measure what was printed
                g.wait_for_console(r"reboot: Power down|Kernel panic", timeout)
            return list(g.console.lines)
        finally:
            g.stop()
    raise AssertionError("unreachable")


def _first(lines: list[Any], rx: re.Pattern[str]) -> Any | None:
    return next((ln for ln in lines if rx.search(ln.text)), None)


def measure_stage(stage: str, kernel: Path, initrd: Path, cmdline: str, work: Path,
                  icount: int | None = None) -> StartupFigures:
    fig = StartupFigures(stage, initrd.stat().st_size)
    plain = boot_once(f"{stage}-plain", kernel, initrd, cmdline, work)
    first = _first(plain, FIRST_LINE)
    assert first is not None, f"{stage}: no stage line on the console:\n" + "\n".join(ln.text for ln in plain[-30:])
    fig.first_line, fig.to_first_line_s = first.text.strip(), round(first.t, 3)
    verbose = boot_once(f"{stage}-verbose", kernel, initrd, " ".join(w for w in cmdline.split() if w != "quiet"), work)
    for attr, rx in (("kernel_start_s", r"Linux version"), ("init_start_s", r"Run /init as init process"),
                     ("verbose_to_first_line_s", FIRST_LINE.pattern)):
        ln = _first(verbose, re.compile(rx))
        setattr(fig, attr, round(ln.t, 3) if ln else None)
    timed = boot_once(f"{stage}-importtime", kernel, initrd, f"{cmdline} cidboot_importtime=1", work, icount=icount)
    texts = [ln.text for ln in timed]
    cut = next((i for i, t in enumerate(texts) if FIRST_LINE.search(t)), len(texts))
    fig.imports_to_first_line_us, fig.top, fig.imported = parse_importtime(texts[:cut])
    fig.imports_total_us, _, _ = parse_importtime(texts)
    fig.modules_to_first_line = len(fig.imported)
    dc = next((m for m in map(DCCODE_RX.search, texts) if m), None)
    fig.dataclass_code = (int(dc[1]), int(dc[2])) if dc else None
    fig.top = fig.top[:15]
    return fig


def build_stages(work: Path) -> dict[str, tuple[Path, Path, str]]:
    """Firmware, bootstrap and hello built as a deployment does (qemu.harness.deploy.prepare):
    stage -> (kernel, initrd, cmdline)."""
    return stages_of(build_deployment(work))


def build_deployment(work: Path) -> Any:
    from qemu.harness.deploy import prepare

    return prepare(HELLO, work / "deploy")


def stages_of(dep: Any) -> dict[str, tuple[Path, Path, str]]:
    out = {}
    for stage, built in (("firmware", dep.firmware), ("bootstrap", dep.bootstrap), ("image", dep.workload)):
        # the build result's cmdline: the bootstrap's manifest lives in the boot-file cache, not dep.store
        out[stage] = (built.kernel, built.initrd, str(built.result.get("cmdline") or "console=ttyS0 quiet panic=-1"))
    return out


def table(figs: list[StartupFigures]) -> str:
    rows = ["| stage | initrd bytes | power-on -> first line (s) | kernel start (s) | /init (s) | imports before first line (ms) | modules | imports whole run (ms) |",
            "|---|---|---|---|---|---|---|---|"]
    for f in figs:
        rows.append(f"| {f.stage} | {f.initrd_bytes} | {f.to_first_line_s:.2f} | {f.kernel_start_s} | {f.init_start_s} | "
                    f"{f.imports_to_first_line_us / 1000:.0f} | {f.modules_to_first_line} | {f.imports_total_us / 1000:.0f} |")
    for f in figs:
        rows.append(f"\n{f.stage}: first line `{f.first_line}`; top imports (cumulative ms): "
                    + ", ".join(f"{n} {us / 1000:.0f}" for n, us in f.top[:10])
                    + (f"; dataclass code table hits/misses {f.dataclass_code[0]}/{f.dataclass_code[1]}"
                       if f.dataclass_code else ""))
    return "\n".join(rows)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_deployment(tmp_path_factory.mktemp("startup"))


@pytest.fixture(scope="module")
def stages(deployment: Any) -> dict[str, tuple[Path, Path, str]]:
    return stages_of(deployment)


@pytest.mark.build
def test_stages_share_one_runtime_layer_named_by_runtime_json(deployment: Any) -> None:
    """firmware, bootstrap and hello, built from the committed flows and locks as a deployment
    does, carry one runtime layer (same CID): the first archive of each initrd. Each config layer's
    /etc/cidboot/runtime.json names exactly those bytes and their member paths in archive order,
    and no later layer repeats a runtime member (a same-kernel hand-over keeps the runtime by this
    list: docs/images.md)."""
    import hashlib

    from cidboot.ipld.cid import CID
    from cidboot.ipld.unixfs.exporter import export_file
    from cidboot.stage.cpio import iter_newc, read_newc
    from cidboot.store.blockstore import Blockstore
    from imagebuilder.build import RUNTIME_JSON_PATH
    from imagebuilder.cpio import decompress, flash_initrd
    from imagebuilder.layers import layer_cid

    cids = {}
    for stage, built in (("firmware", deployment.firmware), ("bootstrap", deployment.bootstrap),
                         ("image", deployment.workload)):
        layers = [lyr for lyr in built.result["layers"] if lyr["role"] != "kernel"]
        assert [lyr["role"] for lyr in layers] == ["runtime", "agent", "operations", "config"]
        initrd = built.initrd.read_bytes()
        if stage == "firmware":  # the flash holds the layers uncompressed (imagebuilder.cpio.flash_initrd)
            bs = Blockstore(deployment.store)
            parts = {lyr["role"]: b"".join(export_file(CID.parse(lyr["cid"]), bs.get)) for lyr in layers}
            assert initrd == flash_initrd(list(parts.values()))
        else:
            assert len(initrd) == sum(lyr["size"] for lyr in layers)
            parts, off = {}, 0
            for lyr in layers:
                parts[lyr["role"]], off = initrd[off:off + lyr["size"]], off + lyr["size"]
        rt = parts["runtime"]
        cids[stage] = layers[0]["cid"]
        assert str(layer_cid(rt)) == layers[0]["cid"]
        doc = json.loads(next(data for m, data in iter_newc(decompress(parts["config"])) if m.path == RUNTIME_JSON_PATH))
        members = read_newc(decompress(rt))
        assert doc == {"cid": layers[0]["cid"], "size": len(rt), "sha256": hashlib.sha256(rt).hexdigest(),
                       "sha512": hashlib.sha512(rt).hexdigest(), "paths": [m.path for m in members]}, stage
        assert not [m.path for m in members if m.path.startswith(("lib/modules", "etc/"))
                    or (m.path.startswith("opt/cidboot/") and not m.path.startswith("opt/cidboot/lib"))]
        files = {m.path for m in members if not m.path.endswith("/") and (m.mode & 0o170000) != 0o040000}
        for role in ("agent", "operations", "config"):
            repeated = files & {m.path for m in read_newc(decompress(parts[role]))}
            assert not repeated, f"{stage}: the {role} layer repeats runtime members {sorted(repeated)[:5]}"
    assert len(set(cids.values())) == 1, f"the stages' runtime layers differ: {cids}"


@pytest.mark.build
def test_stages_import_no_host_side_code_at_start(stages: dict[str, tuple[Path, Path, str]], tmp_path: Path) -> None:
    """Each stage reaches its first console line, and nothing host-side is imported on the way."""
    figs = [measure_stage(s, k, i, c, tmp_path) for s, (k, i, c) in stages.items()]
    print(table(figs))
    for f in figs:
        assert f.first_line, f.stage
        assert f.imported, f"{f.stage}: no -X importtime output: the cidboot_importtime knob did not work"
        leaked = sorted(n for n in f.imported if any(n == h or n.startswith(h + ".") for h in HOST_SIDE))
        assert not leaked, f"{f.stage} imports host-side modules at start: {leaked}"
        # the image builder's table (cidboot.stage.dccache) held every dataclass the start path creates
        assert f.dataclass_code is not None and f.dataclass_code[0] > 0 and f.dataclass_code[1] == 0, \
            f"{f.stage}: dataclass code table hits, misses: {f.dataclass_code}"


def unpack_initrd(initrd: bytes, root: Path) -> None:
    """The concatenated compressed newc archives of an initrd as files under `root` (regular
    files, directories and symlinks; device nodes are skipped)."""
    from imagebuilder.cpio import decompress

    raw = decompress(initrd)  # one flow, one compression: `zstd -dc` and lzma read concatenated streams
    i = 0
    while i + 110 <= len(raw):
        if raw[i:i + 6] != b"070701":
            i += 1
            continue
        mode, size, nlen = int(raw[i + 14:i + 22], 16), int(raw[i + 54:i + 62], 16), int(raw[i + 94:i + 102], 16)
        name = raw[i + 110:i + 110 + nlen - 1].decode()
        off = (i + 110 + nlen + 3) & ~3
        body, i = raw[off:off + size], (off + size + 3) & ~3
        dest, kind = root / name, mode & 0o170000
        if name == "TRAILER!!!":
            continue
        if kind == 0o040000:
            dest.mkdir(parents=True, exist_ok=True)
        elif kind in (0o100000, 0o120000):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            if kind == 0o120000:
                dest.symlink_to(body.decode())
            else:
                dest.write_bytes(body)
                dest.chmod(mode & 0o755)


ENTRY = {"firmware": "firmware.stage", "bootstrap": "bootstrap.stage.main", "image": "agent.device"}


@pytest.mark.build
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot into the unpacked image)")
def test_image_interpreter_loads_every_module_from_shipped_bytecode(stages: dict[str, tuple[Path, Path, str]],
                                                                    tmp_path: Path) -> None:
    """The image's own python3.11 (chroot into the unpacked initramfs, -v, no bytecode writing)
    imports the stage entry and every module comes from the layer's unchecked-hash .pyc: none is
    compiled from source at boot (a magic or cache-tag mismatch would show up here). With the
    image's dataclass code table installed as PID 1 installs it, the image's own `dataclasses`
    finds every text of the entry's import in the table (cidboot.stage.dccache): the build host's
    Python wrote the same texts."""
    for stage, (_k, initrd, _c) in stages.items():
        root = tmp_path / stage
        unpack_initrd(initrd.read_bytes(), root)
        code = ("import sys; sys.path[:0] = ['/opt/cidboot', '/opt/cidboot/lib', '/opt/cidboot/ops']\n"
                "from cidboot.stage import dccache, deferred\n"
                "deferred.install(); n = dccache.install()\n"
                f"import {ENTRY[stage]}\n"
                "print('dataclass code', n, dccache.stats['hits'], dccache.stats['misses'])")
        proc = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-IS", "-B", "-v", "-c", code],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        loaded = re.findall(r"# code object from '?([^'\n]+)'?", proc.stderr)
        from_source = [f for f in loaded if not f.endswith(".pyc")]
        assert len(loaded) > 40 and not from_source, f"{stage}: compiled from source at import: {from_source}"
        _, size, hits, misses = proc.stdout.split()[-4:]
        assert int(size) > 0 and int(hits) > 20 and misses == "0", f"{stage}: dataclass code table: {proc.stdout}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--stage", choices=STAGES, action="append")
    ap.add_argument("--icount", type=int, metavar="SHIFT",
                    help="import times in instructions, not wall-clock: the import-time boot runs with "
                         "-icount shift=SHIFT (0: 1 ns per instruction), so the machine's load does not move them")
    a = ap.parse_args(argv)
    built = build_stages(a.work)
    figs = [measure_stage(s, *built[s], a.work, icount=a.icount) for s in (a.stage or STAGES)]
    print(table(figs))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps([asdict(f) for f in figs], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
