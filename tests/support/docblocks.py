"""Extract the shell blocks a user types from markdown, for the doc test (tests/integration/test_docs.py).

Why: every command in README.md and docs/*.md is run by CI so the docs cannot drift from the
CLIs again (issue 16: the first command a newcomer typed, `imagebuilder keygen keys/x`, was wrong
in four places). The rules, written for doc authors in docs/first-flow.md's last section:

- Only ```sh, ```bash and ```console blocks are shell blocks; every other fence (```yaml,
  ```python, ```text, a bare ```) is prose and never runs.
- An HTML comment right before a block (blank lines between allowed) controls it:
  `<!-- doc-test: skip (reason) -->` does not run a shell block and says why (a QEMU boot, a
  board, a server that runs until stopped); `<!-- doc-test: file PATH -->` writes the block
  that follows (any language) to PATH in the test's directory, so a page can show a flow.yaml
  or ops.py as YAML/Python and the test uses exactly those bytes; `<!-- doc-test: setup` +
  lines + `-->` runs hidden commands before the next shell block (dummy input files). An
  unknown or dangling marker is an error, never silently ignored (a typo must not turn the
  check off).
- Expected output: a ```text block right after a shell block, or a `# => TEXT` comment on a
  command line. `...` inside a line matches anything; each expected line must match a line
  of the output, in order (lines may be left out; a line that is only `...` is ignored).
- In a ```console block, `$ ` lines are commands (a line ending in `\\` continues) and the
  other lines are their expected output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SHELL_LANGS = frozenset({"sh", "bash", "console"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*(?P<end>-->)?\s*$")
_INLINE = re.compile(r"#\s*=>\s*(?P<text>.+?)\s*$")


class DocBlockError(ValueError):
    """A doc-test marker that cannot be honoured (unknown, or not followed by a block)."""


@dataclass(frozen=True)
class Block:
    """One fenced block of a markdown file and what the doc test does with it."""

    path: Path
    line: int                  # 1-based line of the opening fence
    lang: str                  # the fence's info string ("" for a bare fence)
    text: str                  # the content, indentation of the fence removed
    skip: str | None = None    # reason, for `doc-test: skip (reason)`
    write_to: str | None = None  # `doc-test: file PATH`
    setup: str = ""            # hidden commands from `doc-test: setup`
    expected: str | None = None  # the ```text block that follows, if any

    @property
    def is_shell(self) -> bool:
        """A block a user types at a shell prompt (and the doc test runs)."""
        return self.lang in SHELL_LANGS and self.write_to is None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def script(self) -> str:
        """The commands of the block, as one shell script (console: the `$ ` lines)."""
        if self.lang != "console":
            return self.text
        commands: list[str] = []
        continuing = False
        for raw in self.text.splitlines():
            if continuing or raw.startswith("$ ") or raw == "$":
                line = raw if continuing else raw[2:]
                commands.append(line)
                continuing = line.rstrip().endswith("\\")
        return "\n".join(commands) + "\n"

    def expectations(self) -> list[str]:
        """Expected output lines: the following ```text block, console output, `# =>` comments."""
        lines: list[str] = []
        if self.lang == "console":
            continuing = False
            for raw in self.text.splitlines():
                if continuing or raw.startswith("$ ") or raw == "$":
                    continuing = raw.rstrip().endswith("\\")
                    continue
                lines.append(raw)
        if self.expected is not None:
            lines.extend(self.expected.splitlines())
        for raw in self.script().splitlines():
            m = _INLINE.search(raw)
            if m:
                lines.append("..." + m.group("text") + "...")
        return [ln.strip() for ln in lines if ln.strip() and ln.strip() != "..."]


def _line_pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in expected.split("...")))


def unmatched(expected: list[str], output: str) -> str | None:
    """The first expected line no output line matches (in order), or None when all match."""
    actual = [ln.strip() for ln in output.splitlines()]
    i = 0
    for want in expected:
        pattern = _line_pattern(want)
        while i < len(actual) and not pattern.fullmatch(actual[i]):
            i += 1
        if i == len(actual):
            return want
        i += 1
    return None


def _parse_marker(body: str, where: str) -> tuple[str, str]:
    kind, _, arg = body.partition(" ")
    arg = arg.strip()
    if kind == "skip":
        m = re.fullmatch(r"\((.+)\)", arg)
        if not m:
            raise DocBlockError(f"{where}: doc-test: skip needs a reason in parentheses")
        return kind, m.group(1)
    if kind == "file":
        if not arg or arg.startswith("/") or ".." in Path(arg).parts:
            raise DocBlockError(f"{where}: doc-test: file needs a relative path")
        return kind, arg
    if kind == "setup":
        return kind, arg
    raise DocBlockError(f"{where}: unknown doc-test marker {body!r} (skip (reason) | file PATH | setup)")


def extract(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of the markdown file `path`, with its markers and expected output."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    pending: dict[str, str] = {}
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            where = f"{path}:{i + 1}"
            kind, arg = _parse_marker(marker.group("body"), where)
            if kind == "setup" and marker.group("end") is None:
                body: list[str] = [arg] if arg else []
                i += 1
                while i < len(lines) and lines[i].strip() != "-->":
                    body.append(lines[i])
                    i += 1
                if i == len(lines):
                    raise DocBlockError(f"{where}: doc-test: setup is never closed with -->")
                arg = "\n".join(body) + "\n"
            if kind in pending:
                raise DocBlockError(f"{where}: two doc-test: {kind} markers before one block")
            pending[kind] = arg
            pending_line = i + 1
            i += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            if pending and line.strip():
                raise DocBlockError(f"{path}:{pending_line}: doc-test marker not followed by a code block")
            i += 1
            continue
        indent, mark, lang = len(fence.group("indent")), fence.group("fence"), fence.group("lang")
        start = i
        content: list[str] = []
        i += 1
        while i < len(lines):
            close = re.match(r"^ {0,3}(`{3,}|~{3,})\s*$", lines[i])
            if close and close.group(1)[0] == mark[0] and len(close.group(1)) >= len(mark):
                break
            content.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        body_text = "\n".join(content) + ("\n" if content else "")
        if lang == "text" and not pending and blocks and blocks[-1].is_shell and blocks[-1].expected is None \
                and all(not ln.strip() for ln in lines[blocks[-1].line + len(blocks[-1].text.splitlines()) + 1:start]):
            prev = blocks[-1]
            blocks[-1] = Block(prev.path, prev.line, prev.lang, prev.text, prev.skip, prev.write_to,
                               prev.setup, body_text)
            continue
        block = Block(path, start + 1, lang, body_text, skip=pending.get("skip"),
                      write_to=pending.get("file"), setup=pending.get("setup", ""))
        if block.skip is not None and not block.is_shell:
            raise DocBlockError(f"{block.where}: doc-test: skip before a block that is not a shell block")
        if block.setup and not block.is_shell:
            raise DocBlockError(f"{block.where}: doc-test: setup before a block that is not a shell block")
        blocks.append(block)
        pending = {}
    if pending:
        raise DocBlockError(f"{path}:{pending_line}: doc-test marker not followed by a code block")
    return blocks
