"""cidboot.stage.switch_root: the same-kernel rule, reading the next stage's initramfs the way the
kernel does, the hand-off as files, the kexec fallback, and the debug-build handover check.
Nothing here switches a root: the PID-1-only steps are refused or replaced by fakes."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cidboot.stage import switch_root as sr
from cidboot.stage import syscalls
from cidboot.stage.cpio import Entry, archive_bytes, iter_newc
from cidboot.stage.handoff import DICE_PATH, Handoff, load
from cidboot.trust.dice import encode_chain, encode_handover, key_from_cdi

KERNEL = b"MZ fake bzImage " * 64
OTHER_KERNEL = b"MZ another kernel " * 64


def dice() -> bytes:
    a, s = bytes(range(32)), bytes(range(32, 64))
    return encode_handover(a, s, encode_chain(key_from_cdi(a).public_key(), []))


def handoff() -> Handoff:
    return Handoff(dice=dice(), boot={"boot_mode": "measured", "bootconfig": "{}"})


def layer(entries: list[Entry]) -> bytes:
    return archive_bytes(entries, mtime=0)


def image_initrd() -> bytes:
    """Like an image: xz layers, a gzip one, an uncompressed one, zero padding between them."""
    runtime = lzma.compress(layer([Entry.file("usr/bin/python3", b"\x7fELF...", 0o755),
                                   Entry.symlink("bin", "usr/bin"), Entry.file("etc/x", b"old")]),
                            format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    agent = gzip.compress(layer([Entry.file("init", b"#!/usr/bin/python3 -IS\n", 0o755),
                                 Entry.directory("tmp", 0o1777)]), mtime=0)
    config = layer([Entry.file("etc/x", b"new"), Entry.file("etc/cidboot/flow.json", b"{}")])
    head = runtime + b"\0" * 3 + agent
    return head + b"\0" * (8 + -len(head) % 4) + config  # an uncompressed archive starts 4-byte aligned


# -- the rule -------------------------------------------------------------------------------------


def test_same_kernel_bytes_switch_root_and_anything_else_kexecs() -> None:
    running = hashlib.sha512(KERNEL).digest()
    assert sr.decide(KERNEL, running=running) == "switch_root"
    assert sr.decide(OTHER_KERNEL, running=running) == "kexec"
    assert sr.decide(KERNEL[:-1], running=running) == "kexec"


def test_kernel_parameters_the_next_stage_asks_for_must_already_be_in_effect() -> None:
    running = hashlib.sha512(KERNEL).digest()
    now = "console=ttyS0 quiet panic=-1 cidboot.handover=auto"
    assert sr.decide(KERNEL, running=running, cmdline="cidboot.config=tftp://x/y console=ttyS0",
                     running_cmdline=now) == "switch_root"
    assert sr.decide(KERNEL, running=running, cmdline="console=ttyS0 init_on_free=1", running_cmdline=now) == "kexec"
    assert sr.decide(KERNEL, running=running, cmdline="console=ttyS0", running_cmdline=None) == "kexec"


def test_a_stage_that_does_not_know_its_kernel_kexecs() -> None:
    assert sr.decide(KERNEL, running=None) == "kexec"  # fail closed: nothing to compare against


def test_forced_kexec_wins_over_a_matching_kernel() -> None:
    assert sr.decide(KERNEL, running=hashlib.sha512(KERNEL).digest(), forced=True) == "kexec"


def test_running_kernel_hash_is_read_from_the_image_and_garbage_means_unknown(tmp_path: Path) -> None:
    p = tmp_path / "kernel.sha512"
    assert sr.running_kernel_sha512(p) is None
    p.write_text(hashlib.sha512(KERNEL).hexdigest() + "\n")
    assert sr.running_kernel_sha512(p) == hashlib.sha512(KERNEL).digest()
    p.write_text("zz" * 64)
    assert sr.running_kernel_sha512(p) is None
    p.write_text(hashlib.sha256(KERNEL).hexdigest())  # a SHA-256 is not the SHA-512 the rule compares
    assert sr.running_kernel_sha512(p) is None


def test_kexec_is_forced_by_the_command_line_or_by_the_received_handoff(tmp_path: Path) -> None:
    cmd = tmp_path / "cmdline"
    cmd.write_text("console=ttyS0 quiet panic=-1\n")
    assert not sr.kexec_forced(None, cmd)
    assert sr.kexec_forced({"handover": "kexec"}, cmd)
    cmd.write_text("console=ttyS0 cidboot.handover=kexec quiet\n")
    assert sr.kexec_forced({}, cmd)
    assert not sr.kexec_forced({}, tmp_path / "missing")


# -- reading the initramfs ----------------------------------------------------------------------


def test_concatenated_compressed_and_padded_archives_are_read_like_the_kernel_does() -> None:
    parsed = sr.parse_initramfs(image_initrd())
    paths = [m.path for m, _ in parsed.members]
    assert paths.count("etc/x") == 2 and paths[-1] == "etc/x"  # the later layer's, which wins
    assert "init" in paths and "usr/bin/python3" in paths
    assert parsed.files == 5


def test_an_appended_handoff_cpio_is_read_too() -> None:
    h = handoff()
    parsed = sr.parse_initramfs(h.append_to(image_initrd()))
    assert DICE_PATH in [m.path for m, _ in parsed.members]


@pytest.mark.parametrize("magic,name", [(b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh91AY", "bzip2")])
def test_a_compression_the_stage_cannot_read_is_unsupported_not_garbage(magic: bytes, name: str) -> None:
    with pytest.raises(sr.UnsupportedCompression, match=name):
        sr.parse_initramfs(layer([Entry.file("a", b"x")]) + magic + b"\0" * 32)


def test_truncated_or_garbled_initramfs_is_refused_with_the_offset() -> None:
    xz = lzma.compress(layer([Entry.file("a", b"x" * 1000)]), format=lzma.FORMAT_XZ)
    with pytest.raises(sr.InitramfsError, match="offset 0"):
        sr.parse_initramfs(xz[:-20])
    with pytest.raises(sr.InitramfsError, match="unknown data at offset 0"):
        sr.parse_initramfs(b"\x01garbage")
    arch = layer([Entry.file("a", b"x" * 100)])
    with pytest.raises(sr.InitramfsError, match="runs past the end"):
        sr.parse_initramfs(arch[:150])
    with pytest.raises(sr.InitramfsError, match="no files"):
        sr.parse_initramfs(b"\0" * 16)


def test_an_unaligned_uncompressed_archive_is_refused_as_the_kernel_would() -> None:
    with pytest.raises(sr.InitramfsError, match="not 4-byte aligned"):
        sr.parse_initramfs(b"\0" * 2 + layer([Entry.file("a", b"x")]))


def test_member_paths_cannot_escape_the_new_root() -> None:
    good = layer([Entry.file("a", b"x")])
    evil = good.replace(b"a\0", b"/\0", 1)  # the name "/" normalises to nothing
    with pytest.raises(sr.InitramfsError):
        sr.parse_initramfs(evil)


def test_device_nodes_keep_their_major_and_minor() -> None:
    (m,) = [m for m, _ in iter_newc(layer([Entry.chardev("dev/console", 5, 1)])) if m.path == "dev/console"]
    assert m.rdev == (5, 1)


def test_extract_writes_files_links_and_modes_and_later_members_win(tmp_path: Path) -> None:
    sr.extract(sr.parse_initramfs(image_initrd()), str(tmp_path))
    assert (tmp_path / "etc/x").read_bytes() == b"new"
    assert os.readlink(tmp_path / "bin") == "usr/bin"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777



def test_extract_over_an_existing_root_gives_exact_modes_new_inodes_and_replaces_kinds(tmp_path: Path) -> None:
    """Whatever the umask, the archive's permission bits (set-id and sticky included) exactly;
    an existing file is replaced by a new inode, never written through; a directory where the
    archive has a file (and a file or symlink where it has a directory) is replaced; an existing
    directory gets the archive's mode. The caller's umask is back afterwards."""
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "f").write_bytes(b"old")
    old_inode = (tmp_path / "f").stat().st_ino
    keep_open = (tmp_path / "f").open("rb")  # a kept file mapped or open elsewhere keeps its bytes
    (tmp_path / "was_dir").mkdir()
    (tmp_path / "was_dir/inner").write_bytes(b"x")
    (tmp_path / "was_file").write_bytes(b"x")
    (tmp_path / "was_link").symlink_to(tmp_path / "d")
    arc = archive_bytes([Entry.directory("d", 0o755), Entry.file("f", b"new", 0o640), Entry.file("was_dir", b"file"),
                         Entry.directory("was_file", 0o750), Entry.directory("was_link"), Entry.file("suid", b"s", 0o4755),
                         Entry.directory("sticky", 0o1777), Entry.file("new/g", b"g", 0o600)])
    mask = os.umask(0o077)
    try:
        sr.extract(sr.parse_initramfs(arc), str(tmp_path))
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(mask)
    modes = {p: stat.S_IMODE(os.lstat(tmp_path / p).st_mode) for p in ("d", "f", "was_file", "suid", "sticky", "new", "new/g")}
    assert modes == {"d": 0o755, "f": 0o640, "was_file": 0o750, "suid": 0o4755, "sticky": 0o1777, "new": 0o755,
                     "new/g": 0o600}
    assert (tmp_path / "f").read_bytes() == b"new" and (tmp_path / "f").stat().st_ino != old_inode
    assert keep_open.read() == b"old"
    keep_open.close()
    assert (tmp_path / "was_dir").read_bytes() == b"file"
    assert (tmp_path / "was_link").is_dir() and not (tmp_path / "was_link").is_symlink()

# -- the hand-off as files ----------------------------------------------------------------------


def test_handoff_files_are_what_the_next_stage_loads_once(tmp_path: Path) -> None:
    h = handoff()
    for path, data, mode in sr.handoff_files(h):
        p = tmp_path / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
    assert stat.S_IMODE((tmp_path / DICE_PATH).stat().st_mode) == 0o600
    got = load(tmp_path)
    assert got.dice == h.dice and got.boot == h.boot
    assert not (tmp_path / DICE_PATH).exists()  # read once: the CDIs are not left in a file


# -- tearing down ---------------------------------------------------------------------------------


def test_qemu_fw_cfg_is_unloaded_when_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mods = tmp_path / "modules"
    mods.write_text("virtio_net 61440 0 - Live 0x0\nqemu_fw_cfg 20480 0 - Live 0x0\n")
    calls: list[str] = []
    monkeypatch.setattr(syscalls, "delete_module", lambda name, flags=0: calls.append(name))
    assert sr.unload(["qemu_fw_cfg"], mods) == ["qemu_fw_cfg"] and calls == ["qemu_fw_cfg"]
    mods.write_text("virtio_net 61440 0 - Live 0x0\n")
    assert sr.unload(["qemu_fw_cfg"], mods) == []


def test_a_module_that_will_not_unload_refuses_the_handover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mods = tmp_path / "modules"
    mods.write_text("qemu_fw_cfg 20480 1 - Live 0x0\n")

    def busy(name: str, flags: int = 0) -> None:
        raise syscalls.SyscallError("delete_module qemu_fw_cfg: Resource temporarily unavailable (errno 11)")

    monkeypatch.setattr(syscalls, "delete_module", busy)
    with pytest.raises(sr.SwitchRootError, match="qemu_fw_cfg"):
        sr.unload(["qemu_fw_cfg"], mods)


def test_mount_points_with_escaped_characters_are_decoded(tmp_path: Path) -> None:
    m = tmp_path / "mounts"
    m.write_text("rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\nx /mnt/a\\040b tmpfs rw 0 0\n")
    assert sr.mounts(m) == ["/", "/proc", "/mnt/a b"]


def test_delete_tree_empties_a_directory_on_its_device(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/f").write_bytes(b"x")
    (tmp_path / "l").symlink_to("/etc")
    sr.delete_tree(str(tmp_path), os.lstat(tmp_path).st_dev)
    assert list(tmp_path.iterdir()) == []
    assert Path("/etc").is_dir()  # a symlink is removed, never followed



def test_delete_tree_leaves_a_file_mount_point_for_umount_and_raises_on_other_errors(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are deleted without an lstat each (only directories are checked for another device);
    a file that is a mount point (unlink(2): EBUSY) stays for umount, any other failure raises."""
    import errno

    (tmp_path / "busy").write_bytes(b"x")
    (tmp_path / "gone").write_bytes(b"x")
    real_unlink = os.unlink

    def unlink(path: str) -> None:
        if path.endswith("busy"):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    sr.delete_tree(str(tmp_path), os.lstat(tmp_path).st_dev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]

    def denied(path: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "unlink", denied)
    with pytest.raises(PermissionError):
        sr.delete_tree(str(tmp_path), os.lstat(tmp_path).st_dev)

def test_switch_root_refuses_outside_pid1() -> None:
    with pytest.raises(sr.SwitchRootError, match="not PID 1"):
        sr.switch_root(sr.parse_initramfs(image_initrd()), handoff())


# -- the hand-over decision end to end (kexec and switch_root replaced by fakes) ----------------


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    import cidboot.stage.kexec as kexec

    monkeypatch.setattr(kexec, "kexec_boot", lambda k, i, c: seen.update(kexec=(k, i, c)))
    monkeypatch.setattr(sr, "switch_root", lambda parsed, h, **kw: seen.update(switch_root=(parsed, h, kw)))
    return seen


def test_a_different_kernel_kexecs_with_the_handoff_appended_and_secrets_wiped(fakes: dict[str, Any]) -> None:
    secret = bytearray(b"\x42" * 32)
    h = handoff()
    initrd = image_initrd()
    sr.hand_over(OTHER_KERNEL, initrd, "console=ttyS0", h, secrets=[secret], running=hashlib.sha512(KERNEL).digest(),
                 running_cmdline="console=ttyS0")
    k, i, c = fakes["kexec"]
    assert k == OTHER_KERNEL and c == "console=ttyS0"
    assert i.startswith(initrd) and DICE_PATH.encode() in i[len(initrd):]
    assert secret == bytearray(32) and h.dice == bytes(len(h.dice or b""))
    assert "switch_root" not in fakes


def test_the_same_kernel_switches_root_and_does_not_kexec(fakes: dict[str, Any]) -> None:
    secret = bytearray(b"\x42" * 32)
    sr.hand_over(KERNEL, image_initrd(), "console=ttyS0", handoff(), secrets=[secret],
                 running=hashlib.sha512(KERNEL).digest(), running_cmdline="console=ttyS0 quiet")
    parsed, _h, kw = fakes["switch_root"]
    assert parsed.files == 5 and kw["secrets"] == [secret]
    # the fake returned, as a failed switch_root would raise: the fallback is kexec, never nothing
    assert "kexec" in fakes


def test_a_forced_kexec_tells_the_next_stage(fakes: dict[str, Any]) -> None:
    h = handoff()
    sr.hand_over(KERNEL, image_initrd(), "", h, running=hashlib.sha512(KERNEL).digest(), running_cmdline="",
                 forced=True)
    assert "switch_root" not in fakes and h.boot["handover"] == "kexec"


def test_an_unreadable_compression_falls_back_to_kexec(fakes: dict[str, Any]) -> None:
    zstd = b"\x28\xb5\x2f\xfd" + b"\0" * 64
    said: list[str] = []
    sr.hand_over(KERNEL, zstd, "", handoff(), running=hashlib.sha512(KERNEL).digest(), running_cmdline="",
                 log=said.append)
    assert "switch_root" not in fakes and fakes["kexec"][0] == KERNEL
    assert said == ["initramfs: zstd at offset 0: this stage unpacks gzip and xz only (Python 3.11 has no zstd): "
                    "kexec instead, the kernel unpacks it"]


def test_a_kernel_known_to_be_the_running_one_is_never_fetched_for_a_switch_root(fakes: dict[str, Any]) -> None:
    """hand_over_running (the firmware with the server's kernel hint): no kernel bytes, no hash."""
    calls: list[int] = []
    secret = bytearray(b"\x42" * 32)

    def fetch() -> bytes:
        calls.append(1)
        return KERNEL

    sr.hand_over_running(image_initrd(), "", handoff(), fetch, secrets=[secret])
    parsed, _h, kw = fakes["switch_root"]
    assert parsed.files == 5 and kw["secrets"] == [secret]
    # the fake returned, as a failed switch_root would raise: kexec of the fetched kernel, never nothing
    assert calls == [1] and fakes["kexec"][0] == KERNEL


def test_the_running_kernel_is_fetched_for_a_kexec_and_a_refusal_stops_it(fakes: dict[str, Any]) -> None:
    zstd = b"\x28\xb5\x2f\xfd" + b"\0" * 64
    sr.hand_over_running(zstd, "quiet", handoff(), lambda: KERNEL)
    assert "switch_root" not in fakes and fakes["kexec"][0] == KERNEL and fakes["kexec"][2] == "quiet"
    del fakes["kexec"]

    def wrong() -> bytes:
        raise sr.SwitchRootError("not the measured kernel")

    with pytest.raises(sr.SwitchRootError):
        sr.hand_over_running(zstd, "", handoff(), wrong)
    assert "kexec" not in fakes


# -- debug builds: the handover check -------------------------------------------------------------


def test_handover_check_finds_a_secret_left_in_a_reachable_file(tmp_path: Path) -> None:
    secret = os.urandom(32)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ok").write_bytes(b"nothing here" * 100)
    boot = {"handover_check": sr.check_probes([secret])}
    mods = tmp_path / "modules"
    mods.write_text("virtio_net 1 0 - Live 0x0\n")
    line = sr.report_handover_check(boot, "bootstrap", root=str(tmp_path), proc_modules=str(mods))
    assert line is not None and "secrets_found=0" in line and "dice.cbor=gone" in line and "qemu_fw_cfg=absent" in line
    (tmp_path / "etc/leak").write_bytes(b"junk" + secret + b"junk")
    line = sr.report_handover_check(boot, "bootstrap", root=str(tmp_path), proc_modules=str(mods))
    assert line is not None and "secrets_found=1" in line


def test_a_production_handoff_prints_no_handover_check(tmp_path: Path) -> None:
    assert sr.report_handover_check({"boot_mode": "measured"}, "agent", root=str(tmp_path)) is None


def test_probes_do_not_carry_the_secret() -> None:
    secret = os.urandom(32)
    (probe,) = sr.check_probes([secret])
    assert bytes.fromhex(probe["prefix"]) == secret[:4] and secret.hex() not in str(probe)


# -- keeping the running runtime (runtime.json) ----------------------------------------------------

RT_ENTRIES = [Entry.file("usr/bin/python3.11", b"\x7fELF python", 0o755), Entry.symlink("usr/bin/python3", "python3.11"),
              Entry.file("usr/lib/python3.11/os.py", b"# os"), Entry.file("usr/lib/libz.so.1", b"\x7fELF z", 0o644)]


def runtime_layer() -> bytes:
    return gzip.compress(layer(RT_ENTRIES), mtime=0)


def rest_layers(init: bytes = b"#!/usr/bin/python3.11 -IS\n") -> bytes:
    agent = gzip.compress(layer([Entry.file("init", init, 0o755), Entry.directory("tmp", 0o1777),
                                 Entry.directory("dev"), Entry.file("opt/cidboot/app/stage.py", b"# next")]), mtime=0)
    config = gzip.compress(layer([Entry.file("etc/cidboot/flow.json", b"{}")]), mtime=0)
    return agent + config


def runtime_doc(data: bytes | None = None) -> dict[str, Any]:
    data = runtime_layer() if data is None else data
    return {"cid": "bafkreiruntime", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "sha512": hashlib.sha512(data).hexdigest(),
            "paths": [m.path for m, _ in sr.parse_initramfs(data).members]}


def write_runtime_json(root: Path, doc: Any) -> None:
    import json

    (root / "etc/cidboot").mkdir(parents=True, exist_ok=True)
    (root / sr.RUNTIME_JSON).write_text(json.dumps(doc, sort_keys=True))


def running_root(root: Path) -> sr.Runtime:
    """A running stage's root: its initramfs (runtime + its own layers + runtime.json) unpacked,
    plus what the stage left at run time (a hand-off, a secret in /run, bytecode it wrote)."""
    sr.extract(sr.parse_initramfs(runtime_layer() + rest_layers(b"#!old init\n")), str(root))
    write_runtime_json(root, runtime_doc())
    (root / "run/cidboot").mkdir(parents=True)
    (root / "run/cidboot/secret").write_bytes(b"CDI")
    (root / "usr/lib/python3.11/__pycache__").mkdir()
    (root / "usr/lib/python3.11/__pycache__/os.cpython-311.pyc").write_bytes(b"written at run time")
    rt = sr.running_runtime(str(root))
    assert rt is not None
    return rt


def tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return out


def test_runtime_json_is_read_exactly_or_not_at_all(tmp_path: Path) -> None:
    assert sr.running_runtime(str(tmp_path)) is None  # missing: no reuse
    doc = runtime_doc()
    write_runtime_json(tmp_path, doc)
    rt = sr.running_runtime(str(tmp_path))
    assert rt is not None and rt.size == len(runtime_layer()) and rt.paths[0] == "usr"
    for bad in ({**doc, "size": 0}, {**doc, "size": "12"}, {**doc, "sha256": doc["sha256"][:-2]},
                {**doc, "sha512": "zz" * 64}, {**doc, "paths": []}, {**doc, "paths": ["/usr"]},
                {**doc, "paths": ["usr", "usr"]}, {**doc, "paths": ["../etc"]}, {**doc, "extra": 1},
                {k: v for k, v in doc.items() if k != "cid"}, [doc]):
        write_runtime_json(tmp_path, bad)
        assert sr.running_runtime(str(tmp_path)) is None, bad
    (tmp_path / sr.RUNTIME_JSON).write_bytes(b"{not json")
    assert sr.running_runtime(str(tmp_path)) is None


def test_the_runtime_is_kept_only_when_the_initramfs_begins_with_exactly_its_bytes(tmp_path: Path) -> None:
    rt = running_root(tmp_path)
    rtl, rest = runtime_layer(), rest_layers()
    assert sr.keep_plan(rtl + rest, rt, image_root=str(tmp_path)) == (len(rtl), rt.paths)
    other = gzip.compress(layer(RT_ENTRIES + [Entry.file("usr/lib/extra.so", b"x")]), mtime=0)
    assert sr.keep_plan(other + rest, rt, image_root=str(tmp_path)) == (0, ())  # another runtime
    flipped = bytearray(rtl)
    flipped[len(flipped) // 2] ^= 1
    assert sr.keep_plan(bytes(flipped) + rest, rt, image_root=str(tmp_path)) == (0, ())  # wrong hash
    assert sr.keep_plan(rtl[:-1], rt, image_root=str(tmp_path)) == (0, ())  # truncated: shorter than size
    longer = sr.Runtime(rt.cid, rt.size + 1, rt.sha256, rt.sha512, rt.paths)
    assert sr.keep_plan(rtl + rest, longer, image_root=str(tmp_path)) == (0, ())  # wrong size
    assert sr.keep_plan(rtl + rest, None, image_root=str(tmp_path)) == (0, ())  # no runtime.json
    (tmp_path / "usr/lib/libz.so.1").unlink()  # the running root cannot stand for the layer any more
    assert sr.keep_plan(rtl + rest, rt, image_root=str(tmp_path)) == (0, ())
    with pytest.raises(sr.RuntimeMissing, match="lacks usr/lib/libz.so.1"):
        sr.keep_plan(rest, rt, omitted=True, image_root=str(tmp_path))
    with pytest.raises(sr.RuntimeMissing, match="no valid runtime.json"):
        sr.keep_plan(rest, None, omitted=True, image_root=str(tmp_path))


def test_only_the_layers_after_the_kept_runtime_are_parsed_and_they_must_parse(tmp_path: Path) -> None:
    rtl = runtime_layer()
    parsed = sr.parse_initramfs(rtl + rest_layers(), start=len(rtl), keep=("usr",))
    paths = [m.path for m, _ in parsed.members]
    assert "init" in paths and not any(p.startswith("usr/") for p in paths) and parsed.keep == ("usr",)
    with pytest.raises(sr.InitramfsError, match=f"offset {len(rtl)}"):
        sr.parse_initramfs(rtl + b"\x01garbage", start=len(rtl), keep=("usr",))
    with pytest.raises(sr.InitramfsError, match="no files after the kept runtime"):
        sr.parse_initramfs(rtl, start=len(rtl), keep=("usr",))


def test_keeping_the_runtime_gives_the_root_a_full_unpack_gives(tmp_path: Path) -> None:
    """Prune the running root to the listed paths, unpack the other layers: the same tree, byte for
    byte, as unpacking the whole next initramfs into an empty root; nothing the old stage left stays."""
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    old.mkdir()
    fresh.mkdir()
    rt = running_root(old)
    nxt = runtime_layer() + rest_layers()
    start, keep = sr.keep_plan(nxt, rt, image_root=str(old))
    kept = sr.delete_tree(str(old), os.lstat(old).st_dev, frozenset(keep))
    assert kept == len(rt.paths)
    assert not (old / "run").exists() and not (old / "etc/cidboot/runtime.json").exists()
    assert not (old / "usr/lib/python3.11/__pycache__").exists()  # an unlisted directory under a kept one
    sr.extract(sr.parse_initramfs(nxt, start=start, keep=keep), str(old))
    sr.extract(sr.parse_initramfs(nxt), str(fresh))
    assert tree(old) == tree(fresh)
    assert (old / "init").read_bytes() == b"#!/usr/bin/python3.11 -IS\n"


def test_a_kept_file_is_replaced_not_truncated_when_a_later_layer_writes_it(tmp_path: Path) -> None:
    (tmp_path / "lib.so").write_bytes(b"mapped by the running stage")
    before = os.lstat(tmp_path / "lib.so").st_ino
    with open(tmp_path / "lib.so", "rb") as f:
        sr.extract(sr.parse_initramfs(layer([Entry.file("lib.so", b"new")])), str(tmp_path))
        assert f.read() == b"mapped by the running stage"  # the old inode is untouched
    assert (tmp_path / "lib.so").read_bytes() == b"new" and os.lstat(tmp_path / "lib.so").st_ino != before


def test_what_a_mount_point_hid_is_deleted_on_a_kept_root(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/console").write_bytes(b"")  # stands for the archive's node under devtmpfs
    (tmp_path / "usr").mkdir()
    (tmp_path / "proc").mkdir()
    dev = os.lstat(tmp_path).st_dev
    sr.prune_mount_points(["/dev", "/proc", "/sys", "/dev/pts"], dev, frozenset({"proc"}), root=str(tmp_path))
    assert not (tmp_path / "dev").exists() and (tmp_path / "proc").is_dir() and (tmp_path / "usr").is_dir()


def test_same_kernel_with_the_running_runtime_keeps_it_and_unpacks_the_rest(
        fakes: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rt = running_root(tmp_path)
    rtl = runtime_layer()
    sr.hand_over(KERNEL, rtl + rest_layers(), "", handoff(), running=hashlib.sha512(KERNEL).digest(),
                 running_cmdline="", image_root=str(tmp_path))
    parsed, _h, _kw = fakes["switch_root"]
    assert parsed.keep == rt.paths and parsed.files == 3
    assert "cidboot-stage: handover switch_root files=3 kept=8" in capsys.readouterr().out
    assert fakes["kexec"][1].startswith(rtl + rest_layers())  # a switch_root that returns: kexec, whole initrd


def test_a_different_runtime_or_none_is_unpacked_in_full(fakes: dict[str, Any], tmp_path: Path) -> None:
    other = gzip.compress(layer(RT_ENTRIES[:2]), mtime=0)
    sr.hand_over(KERNEL, other + rest_layers(), "", handoff(), running=hashlib.sha512(KERNEL).digest(),
                 running_cmdline="", image_root=str(tmp_path))  # no runtime.json at all
    assert fakes["switch_root"][0].keep == () and fakes["switch_root"][0].files == 4
    running_root(tmp_path)
    sr.hand_over(KERNEL, other + rest_layers(), "", handoff(), running=hashlib.sha512(KERNEL).digest(),
                 running_cmdline="", image_root=str(tmp_path))
    assert fakes["switch_root"][0].keep == () and fakes["switch_root"][0].files == 4


def test_a_malformed_rest_refuses_before_anything_is_torn_down(fakes: dict[str, Any], tmp_path: Path) -> None:
    running_root(tmp_path)
    with pytest.raises(sr.InitramfsError):
        sr.hand_over(KERNEL, runtime_layer() + rest_layers()[:-9], "", handoff(),
                     running=hashlib.sha512(KERNEL).digest(), running_cmdline="", image_root=str(tmp_path))
    assert "switch_root" not in fakes and "kexec" not in fakes
    assert (tmp_path / "run/cidboot/secret").exists()


def test_an_unfetched_runtime_is_kept_and_fetched_only_for_a_kexec(fakes: dict[str, Any], tmp_path: Path) -> None:
    rt = running_root(tmp_path)
    calls: list[str] = []

    def fetch_runtime() -> bytes:
        calls.append("runtime")
        return runtime_layer()

    sr.hand_over_running(rest_layers(), "", handoff(), lambda: KERNEL, fetch_runtime=fetch_runtime,
                         image_root=str(tmp_path))
    assert fakes["switch_root"][0].keep == rt.paths and fakes["switch_root"][0].files == 3
    # the fake switch_root returned: the kexec gets the whole initramfs, runtime fetched first
    assert calls == ["runtime"] and fakes["kexec"][1].startswith(runtime_layer() + rest_layers())
    del fakes["switch_root"], fakes["kexec"]
    zstd = b"\x28\xb5\x2f\xfd" + b"\0" * 64  # the other layers cannot be read here: kexec
    sr.hand_over_running(zstd, "", handoff(), lambda: KERNEL, fetch_runtime=fetch_runtime, image_root=str(tmp_path))
    assert "switch_root" not in fakes and fakes["kexec"][1].startswith(runtime_layer() + zstd)
    del fakes["kexec"]
    (tmp_path / "usr/bin/python3.11").unlink()  # the running root cannot supply it: fetched, unpacked in full
    calls.clear()
    sr.hand_over_running(rest_layers(), "", handoff(), lambda: KERNEL, fetch_runtime=fetch_runtime,
                         image_root=str(tmp_path))
    assert calls == ["runtime"] and fakes["switch_root"][0].keep == () and fakes["switch_root"][0].files == 6


def test_an_unfetched_runtime_is_fetched_for_a_different_kernel(fakes: dict[str, Any], tmp_path: Path) -> None:
    running_root(tmp_path)
    sr.hand_over(OTHER_KERNEL, rest_layers(), "", handoff(), running=hashlib.sha512(KERNEL).digest(),
                 running_cmdline="", fetch_runtime=runtime_layer, image_root=str(tmp_path))
    assert "switch_root" not in fakes and fakes["kexec"][1].startswith(runtime_layer() + rest_layers())


# -- a zstd runtime layer: the boot server's split (runtime_prefix) ---------------------------------


def zstd_bootstrap_initrd(runtime_size_delta: int = 0) -> tuple[bytes, bytes]:
    """(runtime layer in zstd, the rest in gzip with a runtime.json naming that layer), as
    `imagebuilder build` makes a bootstrap whose image.python.runtime.compression is zstd."""
    import json

    from imagebuilder.cpio import compress

    runtime = compress(layer(RT_ENTRIES + [Entry.file("usr/lib/big.so", os.urandom(200_000) + b"\0" * 300_000)]),
                       "zstd")
    doc = {"cid": "bafkreiruntime", "size": len(runtime) + runtime_size_delta,
           "sha256": hashlib.sha256(runtime).hexdigest(), "sha512": hashlib.sha512(runtime).hexdigest(),
           "paths": sorted({e.path for e in RT_ENTRIES} | {"usr", "usr/bin", "usr/lib", "usr/lib/python3.11",
                                                           "usr/lib/big.so"})}
    config = gzip.compress(layer([Entry.file(sr.RUNTIME_JSON, json.dumps(doc, sort_keys=True).encode())]), mtime=0)
    return runtime, rest_layers() + config


def test_the_server_cuts_a_zstd_runtime_off_where_its_frame_ends() -> None:
    """The stage's reader cannot decompress zstd: runtime_prefix finds the frame's end from its
    headers and parses the rest (without it the initrd was served whole, measured as one initrd,
    and the device never affirmed)."""
    runtime, rest = zstd_bootstrap_initrd()
    assert sr.runtime_prefix(runtime + rest) == len(runtime)
    with pytest.raises(sr.UnsupportedCompression):  # the stage itself still cannot unpack it
        sr.parse_initramfs(runtime + rest)


def test_a_zstd_runtime_the_json_does_not_describe_exactly_is_not_cut() -> None:
    runtime, rest = zstd_bootstrap_initrd()
    assert sr.runtime_prefix(runtime) == 0  # nothing after it: no runtime.json
    flipped = bytearray(runtime)
    flipped[len(runtime) // 2] ^= 1  # same frame layout, other bytes: SHA-256 differs
    assert sr.runtime_prefix(bytes(flipped) + rest) == 0
    for delta in (-1, 1):  # runtime.json's size is not the frame's end
        r2, rest2 = zstd_bootstrap_initrd(delta)
        assert sr.runtime_prefix(r2 + rest2) == 0


def test_a_truncated_or_corrupt_zstd_runtime_is_served_whole_not_cut_anywhere() -> None:
    runtime, rest = zstd_bootstrap_initrd()
    for data in (runtime[:-7] + rest,  # truncated: the frame's last block runs into the gzip
                 runtime[:-7],  # truncated, nothing after it
                 runtime[:4] + bytes([runtime[4] | 0x08]) + runtime[5:] + rest):  # reserved header bit
        assert sr.runtime_prefix(data) == 0  # never an exception: a boot server keeps serving
