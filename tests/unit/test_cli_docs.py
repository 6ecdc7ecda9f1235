"""The commands the docs tell a newcomer to type parse (was: `imagebuilder keygen keys/signer-1`
in four places while the CLI wanted `-o`), and README's command table names every command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cidboot.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("examples/**/*.md")),
        *sorted(REPO.glob("examples/*/flow.yaml")), *sorted(REPO.glob("*/README.md"))]
PROGS = {"imagebuilder": "imagebuilder.commands", "bootstrap": "bootstrap.commands", "agent": "agent.commands",
         "firmware": "firmware.commands"}


def keygen_lines() -> list[tuple[str, str]]:
    out = []
    for f in DOCS:
        for m in re.finditer(r"imagebuilder keygen[^`\n#]*", f.read_text()):
            out.append((str(f.relative_to(REPO)), m.group(0).strip()))
    return out


@pytest.mark.parametrize("where,cmd", keygen_lines())
def test_every_documented_keygen_parses_and_names_its_output(where: str, cmd: str) -> None:
    args = build_parser("imagebuilder", "", "imagebuilder.commands").parse_args(shlex.split(cmd)[1:])
    assert args.output or args.flow_secret, f"{where}: {cmd} (give -o STEM, or --flow-secret FILE for a flow secret)"
    assert args.stem is None, f"{where}: {cmd} (the docs use the -o form)"


def test_keygen_accepts_a_bare_stem_too(tmp_path: Path) -> None:
    from imagebuilder.cli import main

    assert main(["keygen", str(tmp_path / "k")]) == 0 and (tmp_path / "k.pem").exists()
    assert main(["keygen"]) == 2
    assert main(["keygen", str(tmp_path / "a"), "-o", str(tmp_path / "b")]) == 2


@pytest.mark.parametrize("prog,package", PROGS.items())
def test_readme_command_table_names_every_command(prog: str, package: str) -> None:
    readme = REPO / "README.md"
    row = next(line for line in readme.read_text().splitlines() if line.startswith(f"| `{prog}` |"))
    sub = next(a for a in build_parser(prog, "", package)._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"`{name}" not in row]  # type: ignore[union-attr]
    assert not missing, f"README.md's {prog} row does not name {missing}"
