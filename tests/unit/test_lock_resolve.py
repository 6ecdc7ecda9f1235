"""flow.lock resolution against a fake apt (no network): a kernel metapackage is followed to
the concrete ABI package and both are pinned; `lock` keeps pins the mirror still serves and
moves only the gone ones; `--update` moves everything; a pin the index lists with another hash
is refused, never re-pinned; the harness re-locks its copy of a flow, never the committed lock."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from imagebuilder import lock as lockmod
from imagebuilder.flowfile import FlowFile
from imagebuilder.lock import (
    Lock,
    LockError,
    LockFormatError,
    MetaPin,
    PinMismatchError,
    changes,
    kernel_depends,
    make_lock,
    relock_if_unavailable,
    resolve_kernel,
)

REPO = Path(__file__).resolve().parents[2]
META = "linux-image-cloud-amd64"
ABI56, ABI57 = "linux-image-6.1.0-56-cloud-amd64", "linux-image-6.1.0-57-cloud-amd64"


@dataclass
class FakeApt:
    """An apt index and mirror: (name, version) -> (.deb bytes, Depends); the candidate of a
    name is its last added version. Records every command it answers."""

    pkgs: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    candidate: dict[str, str] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    listed_sha: dict[tuple[str, str], str] = field(default_factory=dict)  # index hash overrides (a rebuild)

    def add(self, name: str, version: str, depends: str = "") -> None:
        self.pkgs[(name, version)] = (f"{name} {version} deb".encode(), depends)
        self.candidate[name] = version

    def drop(self, name: str, version: str) -> None:
        del self.pkgs[(name, version)]
        left = [v for (n, v) in self.pkgs if n == name]
        if left:
            self.candidate[name] = left[-1]
        else:
            self.candidate.pop(name, None)

    def sha(self, name: str, version: str) -> str:
        return self.listed_sha.get((name, version)) or hashlib.sha256(self.pkgs[(name, version)][0]).hexdigest()

    def stanza(self, name: str, version: str) -> str:
        data, depends = self.pkgs[(name, version)]
        lines = [f"Package: {name}", f"Version: {version}", "Architecture: amd64"]
        if depends:
            lines.append(f"Depends: {depends}")
        lines += [f"Size: {len(data)}", f"SHA256: {self.sha(name, version)}", "Description: x", " continued"]
        return "\n".join(lines) + "\n"

    def lookup(self, spec: str) -> tuple[str, str] | None:
        name, _, version = spec.partition("=")
        version = version or self.candidate.get(name, "")
        return (name, version) if (name, version) in self.pkgs else None

    def __call__(self, cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        if cmd[:3] == ["apt-cache", "show", "--no-all-versions"]:
            found = [k for k in (self.lookup(s) for s in cmd[3:]) if k]
            out = "\n".join(self.stanza(*k) for k in found)
            return subprocess.CompletedProcess(cmd, 0 if found else 100, out, "" if found else "E: No packages found")
        if cmd[:2] == ["apt-get", "download"]:
            k = self.lookup(cmd[2])
            if k is None:
                return subprocess.CompletedProcess(cmd, 100, "", f"E: Version '{cmd[2]}' was not found")
            assert cwd is not None
            Path(cwd, f"{k[0]}_{k[1].replace(':', '%3a')}_amd64.deb").write_bytes(self.pkgs[k][0])
            return subprocess.CompletedProcess(cmd, 0, "", "")
        raise AssertionError(f"unexpected command {cmd}")

    def downloads(self) -> list[str]:
        return [c[2] for c in self.calls if c[:2] == ["apt-get", "download"]]


@pytest.fixture
def apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeApt:
    fake = FakeApt()
    fake.add(ABI56, "6.1.192-2", "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool")
    fake.add(META, "6.1.192-2", f"{ABI56} (= 6.1.192-2)")
    fake.add("libc6", "2.36-9+deb12u14", "libgcc-s1")
    monkeypatch.setattr(lockmod, "_run", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return fake


def _flow(kernel: str = META, version: str | None = None, path: Path = Path("/x/flow.yaml")) -> FlowFile:
    k: dict[str, Any] = {"package": kernel, **({"version": version} if version else {})}
    data = {"image": {"kernel": k, "python": {"runtime": {"packages": ["libc6"]}}}}
    return cast(FlowFile, SimpleNamespace(data=data, path=path))


def _new_kernel(apt: FakeApt) -> None:
    """Debian's security archive moves to the next ABI and drops the previous one."""
    apt.add(ABI57, "6.1.200-1", "kmod, linux-base (>= 4.3~)")
    apt.add(META, "6.1.200-1", f"{ABI57} (= 6.1.200-1)")
    apt.drop(ABI56, "6.1.192-2")
    apt.drop(META, "6.1.192-2")


def test_kernel_depends_reads_the_linux_image_clause_and_its_exact_version() -> None:
    assert kernel_depends(f"{ABI56} (= 6.1.192-2)") == [(ABI56, "6.1.192-2")]
    assert kernel_depends("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120) | linux-initramfs-tool") == []
    assert kernel_depends(f"{ABI56}:amd64 (>= 6.1) | linux-image-other, kmod") == [(ABI56, None)]
    assert kernel_depends(f"{ABI56}(=6.1.192-2)") == [(ABI56, "6.1.192-2")]
    assert kernel_depends("") == []


def test_metapackage_is_resolved_to_the_concrete_abi_package_and_both_are_pinned(apt: FakeApt) -> None:
    lock = make_lock(_flow())
    meta = lock.meta[META]
    assert isinstance(meta, MetaPin) and meta.resolves_to == ABI56 and meta.version == "6.1.192-2"
    assert meta.sha256 == apt.sha(META, "6.1.192-2")
    concrete = lock.pin(META)
    assert (concrete.name, concrete.version, concrete.sha256) == (ABI56, "6.1.192-2", apt.sha(ABI56, "6.1.192-2"))
    assert META not in lock.debs and set(lock.debs) == {ABI56, "libc6"}
    assert f"{ABI56}=6.1.192-2" in apt.downloads()  # the concrete .deb's hash was checked by download
    assert lock.named()[META]["version"] == "6.1.192-2" and lock.named()[ABI56]["name"] == ABI56


def test_lock_with_a_metapackage_round_trips_and_names_its_concrete_pin(apt: FakeApt, tmp_path: Path) -> None:
    lock = make_lock(_flow())
    p = tmp_path / "flow.lock"
    p.write_text(lock.to_json())
    doc = json.loads(p.read_text())
    assert doc["meta"][META]["resolves_to"] == ABI56 and doc["debs"][ABI56]["version"] == "6.1.192-2"
    again = Lock.load(p)
    assert again == lock and again.pin(META) == lock.debs[ABI56]


def test_a_lock_without_a_metapackage_is_written_as_before(apt: FakeApt) -> None:
    doc = json.loads(make_lock(_flow(kernel=ABI56)).to_json())
    assert "meta" not in doc and set(doc["debs"]) == {ABI56, "libc6"}


def test_metapackage_pointing_at_a_pin_the_lock_lacks_is_malformed(apt: FakeApt, tmp_path: Path) -> None:
    doc = json.loads(make_lock(_flow()).to_json())
    del doc["debs"][ABI56]
    (tmp_path / "flow.lock").write_text(json.dumps(doc))
    with pytest.raises(LockFormatError, match=f"metapackage {META} resolves to {ABI56}, which the lock does not pin"):
        Lock.load(tmp_path / "flow.lock")


def test_metapackage_naming_two_kernels_is_refused_not_guessed(apt: FakeApt) -> None:
    apt.add("linux-image-both", "1", f"{ABI56} (= 6.1.192-2), linux-image-6.1.0-55-cloud-amd64")
    with pytest.raises(LockError, match="depends on 2 kernel packages"):
        resolve_kernel("linux-image-both")


def test_relock_keeps_pins_still_served_without_downloading(apt: FakeApt) -> None:
    first = make_lock(_flow())
    apt.add(ABI57, "6.1.200-1")
    apt.add(META, "6.1.200-1", f"{ABI57} (= 6.1.200-1)")  # newer, but the old one is still served
    apt.calls.clear()
    again = make_lock(_flow(), previous=first)
    assert again == first
    assert apt.downloads() == []
    assert changes(first, again) == []


def test_changes_name_a_concrete_pin_that_moved_under_the_same_metapackage(apt: FakeApt) -> None:
    first = make_lock(_flow())
    apt.add(ABI56, "6.1.192-3")  # a rebuilt ABI package under the same metapackage version
    again = Lock({**first.debs, ABI56: lockmod.resolve_deb(ABI56, "6.1.192-3")}, first.wheels, dict(first.meta))
    assert changes(first, again) == [f"{META} 6.1.192-2 ({ABI56} 6.1.192-2) -> 6.1.192-2 ({ABI56} 6.1.192-3)"]


def test_relock_moves_only_the_pins_the_mirror_dropped(apt: FakeApt) -> None:
    first = make_lock(_flow())
    _new_kernel(apt)
    said: list[str] = []
    again = make_lock(_flow(), said.append, previous=first)
    assert again.meta[META].resolves_to == ABI57 and again.pin(META).version == "6.1.200-1"
    assert again.debs["libc6"] == first.debs["libc6"] and ABI56 not in again.debs
    assert changes(first, again) == [f"{META} 6.1.192-2 ({ABI56} 6.1.192-2) -> 6.1.200-1 ({ABI57} 6.1.200-1)"]
    assert f"pinned {META} -> {ABI57} 6.1.200-1" in said and "kept libc6 2.36-9+deb12u14" in said


def test_update_re_resolves_every_pin_to_what_the_mirror_serves_now(apt: FakeApt) -> None:
    first = make_lock(_flow())
    apt.add(ABI57, "6.1.200-1")
    apt.add(META, "6.1.200-1", f"{ABI57} (= 6.1.200-1)")
    apt.add("libc6", "2.36-9+deb12u15")
    again = make_lock(_flow(), previous=first, update=True)
    assert again.pin(META).name == ABI57 and again.debs["libc6"].version == "2.36-9+deb12u15"
    assert changes(first, again) == ["libc6 2.36-9+deb12u14 -> 2.36-9+deb12u15",
                                     f"{META} 6.1.192-2 ({ABI56} 6.1.192-2) -> 6.1.200-1 ({ABI57} 6.1.200-1)"]


def test_a_pin_the_index_lists_with_another_hash_is_refused_not_re_pinned(apt: FakeApt) -> None:
    first = make_lock(_flow())
    apt.listed_sha[("libc6", "2.36-9+deb12u14")] = "0" * 64
    with pytest.raises(PinMismatchError, match="libc6 2.36-9\\+deb12u14 with another SHA-256"):
        make_lock(_flow(), previous=first)


def test_moving_from_the_abi_name_to_the_metapackage_keeps_the_same_concrete_pin(apt: FakeApt) -> None:
    old = make_lock(_flow(kernel=ABI56))
    new = make_lock(_flow(), previous=old)
    assert new.pin(META) == old.debs[ABI56]
    assert changes(old, new) == [f"{META} 6.1.192-2 ({ABI56} 6.1.192-2) added, unchanged"]


def test_a_version_the_flow_asks_for_is_the_metapackage_version(apt: FakeApt) -> None:
    first = make_lock(_flow())
    _new_kernel(apt)
    apt.add(META, "6.1.192-2", f"{ABI56} (= 6.1.192-2)")  # the old metapackage, but its ABI package is gone
    with pytest.raises(LockError, match=f"{ABI56}=6.1.192-2 is not known to apt"):
        make_lock(_flow(version="6.1.192-2"), previous=first)


def test_stale_pin_build_hint_names_lock_update(apt: FakeApt) -> None:
    pin = make_lock(_flow()).pin(META)
    (lockmod.cache_dir() / "debs" / pin.filename).unlink()
    _new_kernel(apt)
    hint = f"the lock F is stale: {lockmod.update_hint(_flow())}"
    with pytest.raises(LockError) as exc:
        lockmod.fetch_deb(pin, hint)
    assert f"pinned {ABI56} 6.1.192-2 is not served by the configured apt mirrors" in str(exc.value)
    assert "run `imagebuilder lock --update /x/flow.yaml` to re-resolve its pins" in str(exc.value)


# -- the harness's copy of a flow --------------------------------------------------------------------------


@pytest.fixture
def hello_copy(apt: FakeApt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """examples/hello with its committed lock, in a work dir, and a fake mirror serving exactly
    its pins (the copy's hashes are the fake .debs'); wheels are not this test's concern."""
    d = tmp_path / "work" / "workload"
    shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    doc = json.loads((d / "flow.lock").read_text())
    for name, pin in doc["debs"].items():
        apt.add(name, pin["version"])
        pin["sha256"], pin["size"] = apt.sha(name, pin["version"]), len(apt.pkgs[(name, pin["version"])][0])
    for name, m in doc["meta"].items():
        apt.add(name, m["version"], f"{m['resolves_to']} (= {doc['debs'][m['resolves_to']]['version']})")
        m["sha256"], m["size"] = apt.sha(name, m["version"]), len(apt.pkgs[(name, m["version"])][0])
    (d / "flow.lock").write_text(json.dumps(doc))
    monkeypatch.setattr(lockmod, "fetch_wheel", lambda pin, hint, arch="amd64": Path(pin.filename))
    return d / "flow.yaml"


def test_relock_copy_does_nothing_while_every_pin_is_served(apt: FakeApt, hello_copy: Path) -> None:
    before = hello_copy.with_name("flow.lock").read_text()
    assert relock_if_unavailable(hello_copy) == []
    assert hello_copy.with_name("flow.lock").read_text() == before
    assert apt.downloads() == []


def test_relock_copy_follows_the_mirror_when_the_kernel_pin_is_gone(apt: FakeApt, hello_copy: Path) -> None:
    committed = Lock.load(hello_copy.with_name("flow.lock"))
    gone = committed.pin(META)
    del apt.pkgs[(gone.name, gone.version)]
    del apt.pkgs[(META, committed.meta[META].version)]
    apt.add(ABI57, "6.1.200-1")
    apt.add(META, "6.1.200-1", f"{ABI57} (= 6.1.200-1)")
    moved = relock_if_unavailable(hello_copy)
    assert moved == [f"{META} {committed.meta[META].version} ({gone.name} {gone.version}) -> 6.1.200-1 "
                     f"({ABI57} 6.1.200-1)"]
    relocked = Lock.load(hello_copy.with_name("flow.lock"))
    assert relocked.pin(META).name == ABI57
    assert {k: v for k, v in relocked.debs.items() if k != ABI57} == {k: v for k, v in committed.debs.items()
                                                                      if k != gone.name}
    assert apt.downloads() == [f"{ABI57}=6.1.200-1"]


def test_harness_relocks_its_copy_says_so_and_leaves_the_committed_lock(apt: FakeApt, hello_copy: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from qemu.harness import deploy

    committed_text = (REPO / "examples/hello/flow.lock").read_text()
    committed = Lock.load(hello_copy.with_name("flow.lock"))
    gone = committed.pin(META)
    del apt.pkgs[(gone.name, gone.version)]
    del apt.pkgs[(META, committed.meta[META].version)]
    apt.add(ABI57, "6.1.200-1")
    apt.add(META, "6.1.200-1", f"{ABI57} (= 6.1.200-1)")
    assert deploy.relock_copy(hello_copy) == [f"{META} {committed.meta[META].version} ({gone.name} {gone.version}) "
                                              f"-> 6.1.200-1 ({ABI57} 6.1.200-1)"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "re-locked this run's copy" in err[0] and f"-> 6.1.200-1 ({ABI57} 6.1.200-1)" in err[0]
    assert Lock.load(hello_copy.with_name("flow.lock")).pin(META).name == ABI57
    assert (REPO / "examples/hello/flow.lock").read_text() == committed_text
    # the committed flow itself is never re-locked, even when its pins are gone
    assert deploy.relock_copy(REPO / "examples/hello/flow.yaml") == []
    assert (REPO / "examples/hello/flow.lock").read_text() == committed_text


def test_relock_copy_reports_a_bogus_pinned_version_moving_back_to_the_served_one(apt: FakeApt,
                                                                                  hello_copy: Path) -> None:
    committed = Lock.load(hello_copy.with_name("flow.lock"))
    abi, version = committed.pin(META).name, committed.pin(META).version
    doc = json.loads(hello_copy.with_name("flow.lock").read_text())
    doc["debs"][abi] |= {"version": "6.1.0-gone", "filename": "gone.deb"}  # as the stale-pin build test does
    hello_copy.with_name("flow.lock").write_text(json.dumps(doc))
    meta_version = committed.meta[META].version
    assert relock_if_unavailable(hello_copy) == [f"{META} {meta_version} ({abi} 6.1.0-gone) -> {meta_version} "
                                                 f"({abi} {version})"]
    assert Lock.load(hello_copy.with_name("flow.lock")).pin(META) == committed.pin(META)
