"""The doc test's block extractor (tests/support/docblocks.py): which blocks run, markers,
expected output. The doc test itself (tests/integration/test_docs.py) runs the blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.docblocks import Block, DocBlockError, extract, unmatched

DOC = Path("docs/x.md")


def blocks(md: str) -> list[Block]:
    return extract(DOC, md)


def test_only_sh_bash_console_are_shell_blocks() -> None:
    md = "\n".join(f"```{lang}\necho {lang or 'bare'}\n```\n" for lang in
                   ("sh", "bash", "console", "yaml", "json", "python", "text", "", "shell-session"))
    got = {b.lang: b.is_shell for b in blocks(md)}
    assert got == {"sh": True, "bash": True, "console": True, "yaml": False, "json": False,
                   "python": False, "text": False, "": False, "shell-session": False}


def test_a_block_without_a_marker_runs_and_lines_are_reported() -> None:
    (b,) = blocks("# t\n\n```sh\nmake demo\n```\n")
    assert b.is_shell and b.skip is None and b.line == 3 and b.where == "docs/x.md:3"
    assert b.script() == "make demo\n"


def test_skip_marker_with_reason_applies_to_the_next_block_only() -> None:
    md = "<!-- doc-test: skip (needs a board) -->\n\n```sh\nagent attest x\n```\n\n```sh\ntrue\n```\n"
    first, second = blocks(md)
    assert first.skip == "needs a board"
    assert second.skip is None


def test_skip_without_a_reason_is_an_error() -> None:
    with pytest.raises(DocBlockError, match="reason"):
        blocks("<!-- doc-test: skip -->\n```sh\ntrue\n```\n")


def test_unknown_marker_is_an_error_not_ignored() -> None:
    with pytest.raises(DocBlockError, match="unknown doc-test marker"):
        blocks("<!-- doc-test: skp (typo) -->\n```sh\ntrue\n```\n")


def test_marker_not_followed_by_a_block_is_an_error() -> None:
    with pytest.raises(DocBlockError, match="not followed by a code block"):
        blocks("<!-- doc-test: skip (x) -->\nsome prose\n```sh\ntrue\n```\n")
    with pytest.raises(DocBlockError, match="not followed by a code block"):
        blocks("text\n<!-- doc-test: skip (x) -->\n")


def test_skip_before_a_yaml_block_is_an_error() -> None:
    with pytest.raises(DocBlockError, match="not a shell block"):
        blocks("<!-- doc-test: skip (x) -->\n```yaml\na: 1\n```\n")


def test_file_marker_writes_the_block_and_it_is_not_run() -> None:
    (b,) = blocks("<!-- doc-test: file wc/ops.py -->\n```python\ndef f(): pass\n```\n")
    assert b.write_to == "wc/ops.py" and b.text == "def f(): pass\n" and not b.is_shell
    with pytest.raises(DocBlockError, match="relative path"):
        blocks("<!-- doc-test: file /etc/passwd -->\n```text\nx\n```\n")
    with pytest.raises(DocBlockError, match="relative path"):
        blocks("<!-- doc-test: file ../up -->\n```text\nx\n```\n")


def test_setup_marker_body_runs_before_the_block() -> None:
    (b,) = blocks("<!-- doc-test: setup\necho a > f\nmkdir d\n-->\n```sh\ncat f\n```\n")
    assert b.setup == "echo a > f\nmkdir d\n" and b.is_shell
    with pytest.raises(DocBlockError, match="never closed"):
        blocks("<!-- doc-test: setup\necho a\n```sh\ncat f\n```\n")


def test_text_block_after_a_shell_block_is_its_expected_output() -> None:
    (b, c) = blocks("```sh\nimagebuilder verify M\n```\n\n```text\n✓ format: ...\n...\n```\n\n```text\nnot output\n```\n")
    assert b.expected == "✓ format: ...\n...\n"
    assert b.expectations() == ["✓ format: ..."]
    assert c.lang == "text" and not c.is_shell      # a second text block is prose


def test_text_block_after_prose_is_not_expected_output() -> None:
    b, t = blocks("```sh\ntrue\n```\nprose\n```text\nx\n```\n")
    assert b.expected is None and t.lang == "text"


def test_inline_arrow_comment_is_an_expectation() -> None:
    (b,) = blocks("```sh\nagent run f.yaml --identity d   # => count = 9\n```\n")
    assert b.expectations() == ["...count = 9..."]


def test_console_block_splits_commands_and_output() -> None:
    (b,) = blocks("```console\n$ echo a \\\n  b\na b\n$ true\n```\n")
    assert b.script() == "echo a \\\n  b\ntrue\n"
    assert b.expectations() == ["a b"]


def test_indented_fence_in_a_list_is_dedented() -> None:
    (b,) = blocks("- step:\n\n   ```sh\n   echo hi\n   ```\n")
    assert b.script() == "echo hi\n"


def test_longer_fence_contains_a_shorter_one() -> None:
    (b,) = blocks("````sh\ncat <<'EOF'\n```\nEOF\n````\n")
    assert b.script() == "cat <<'EOF'\n```\nEOF\n"


def test_unmatched_finds_lines_in_order_with_ellipsis() -> None:
    out = "✓ format: signed manifest word-count v1\n✓ signatures: 1 of threshold 1: ab12\ncount = 9  (bafyrei42)\n"
    assert unmatched(["✓ signatures: 1 of threshold 1: ...", "count = 9  (bafyrei...)"], out) is None
    assert unmatched(["count = 9  (bafyrei...)", "✓ format: ..."], out) == "✓ format: ..."   # order matters
    assert unmatched(["count = 10  (...)"], out) == "count = 10  (...)"
    assert unmatched(["count = 9"], out) == "count = 9"           # whole line, unless `...`
    assert unmatched(["...count = 9..."], out) is None


def test_the_repo_docs_parse() -> None:
    repo = Path(__file__).resolve().parents[2]
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        extract(doc.relative_to(repo), doc.read_text())
