"""The doc test: every shell block in README.md and docs/*.md that a user types is run, and its
expected output checked, so the docs cannot drift from the CLIs (issue 16: the first command a
newcomer typed was wrong in four places).

Each markdown file runs in its own fresh temp dir, its blocks in order, like one terminal
session: `set -e -o pipefail`, variables assigned in one block (`M=$(...)`) and `cd` carry over to
the next. The repo's CLIs come first on PATH (wrappers that import this checkout, not an installed
copy) and the repo is on PYTHONPATH (`python -m qemu.harness`); the default block store is inside
the temp dir (XDG_DATA_HOME), the build cache (~/.cache/cidboot) is shared as a user's is.

The marker syntax (skip / file / setup, ```text expected output, `# =>`) is in
tests/support/docblocks.py. Blocks marked `doc-test: skip (reason)` are reported as skipped tests
with their reason (`pytest -ra` lists them). A block that builds or locks an image, and every
block after it in the same file (they depend on it), is marked `build`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.docblocks import Block, extract, unmatched

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK_TIMEOUT = 900  # an image build on a loaded 2-core machine takes minutes
BUILDS = ("imagebuilder build", "imagebuilder lock")


def _blocks() -> list[tuple[Path, list[Block]]]:
    return [(doc, extract(doc.relative_to(REPO), doc.read_text())) for doc in DOCS]


def _params() -> list[object]:
    params: list[object] = []
    for doc, blocks in _blocks():
        building = False
        for index, block in enumerate(blocks):
            if not block.is_shell:
                continue
            building = building or (block.skip is None and any(b in block.script() for b in BUILDS))
            marks = [pytest.mark.build] if building else []
            params.append(pytest.param(doc, index, marks=marks, id=block.where))
    return params


@dataclass
class Session:
    """One markdown file's terminal: its temp dir, the state between blocks, what has run."""

    root: Path
    done: int = 0                       # blocks[:done] have been applied
    failed: str | None = None


_SESSIONS: dict[Path, Session] = {}


def _wrappers(bindir: Path) -> None:
    """One executable per console script in pyproject.toml, importing this checkout."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        path = bindir / name
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                        f"from {module} import {func}\nsys.exit({func}())\n")
        path.chmod(0o755)


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CIDBOOT_STORE", "PYTEST_CURRENT_TEST")}
    env["PATH"] = f"{root / '.bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["XDG_DATA_HOME"] = str(root / ".xdg-data")
    return env


def _run_shell(session: Session, block: Block) -> str:
    state, cwd = session.root / ".state.sh", session.root / ".cwd"
    script = (f"set -a\n[ -f {state} ] && . {state}\ncd \"$(cat {cwd})\"\nset -e -o pipefail\n"
              f"{block.setup}{block.script()}\nset +e\nexport -p > {state}\npwd > {cwd}\n")
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=session.root / "work", env=_env(session.root),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{block.where}: still running after {BLOCK_TIMEOUT} s (a server? mark it "
                             f"`<!-- doc-test: skip (reason) -->`)\n--- output ---\n{e.output or ''}") from None
    out = proc.stdout
    if proc.returncode != 0:
        raise AssertionError(f"{block.where}: exit {proc.returncode}\n--- block ---\n{block.script()}"
                             f"--- output ---\n{out}")
    missing = unmatched(block.expectations(), out)
    if missing is not None:
        raise AssertionError(f"{block.where}: expected a line matching {missing!r}\n--- output ---\n{out}")
    return out


def _apply(session: Session, blocks: list[Block], upto: int) -> None:
    """Run / write blocks[done:upto] (the ones before the block under test), in order."""
    while session.done < upto:
        block = blocks[session.done]
        session.done += 1
        if block.write_to is not None:
            target = Path((session.root / ".cwd").read_text().strip()) / block.write_to
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text)
        elif block.is_shell and block.skip is None:
            try:
                _run_shell(session, block)
            except AssertionError as e:
                session.failed = f"{block.where} failed"
                pytest.fail(f"an earlier block failed: {e}", pytrace=False)


def _session(doc: Path, tmp_root: Path) -> Session:
    if doc not in _SESSIONS:
        root = Path(tempfile.mkdtemp(prefix=doc.stem + "-", dir=tmp_root))
        (root / ".bin").mkdir()
        (root / "work").mkdir()
        (root / ".cwd").write_text(str(root / "work") + "\n")
        _wrappers(root / ".bin")
        _SESSIONS[doc] = Session(root)
    return _SESSIONS[doc]


@pytest.fixture(scope="module")
def doc_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs")


@pytest.mark.parametrize(("doc", "index"), _params())
def test_doc_block(doc: Path, index: int, doc_tmp: Path) -> None:
    blocks = extract(doc.relative_to(REPO), doc.read_text())
    block = blocks[index]
    if block.skip is not None:
        pytest.skip(f"{block.where}: {block.skip}")
    session = _session(doc, doc_tmp)
    if session.failed is not None:
        pytest.fail(f"an earlier block of {doc.name} failed: {session.failed}", pytrace=False)
    _apply(session, blocks, index)
    session.done = index + 1
    try:
        _run_shell(session, block)
    except AssertionError as e:
        session.failed = f"{block.where} failed"
        pytest.fail(str(e), pytrace=False)


def test_every_doc_parses_and_the_skips_are_few() -> None:
    """Every marker is valid (extract raises otherwise) and most shell blocks run: a doc page that
    skips everything is not tested. Prints the inventory (`pytest -s`): blocks run, skipped, why."""
    run, skipped = 0, []
    for _doc, blocks in _blocks():
        for b in blocks:
            if b.is_shell and b.skip is None:
                run += 1
            elif b.is_shell:
                skipped.append(f"{b.where}: {b.skip}")
    print(f"doc test: {run} shell blocks run, {len(skipped)} skipped:")
    for line in skipped:
        print("  skipped", line)
    assert run > len(skipped) / 2, f"only {run} doc blocks run, {len(skipped)} skipped"
