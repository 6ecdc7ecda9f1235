"""bench/common.py `hold_freed_memory`: the benches keep freed memory in the guest on a VM that
reports it to the host at once, put the old value back, and say what they found."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import common


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """The atexit registrations, kept instead of run at the test process's exit."""
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(common.atexit, "register", lambda fn, *a: calls.append((fn, *a)))
    return calls


def test_a_vm_reporting_at_once_is_held_and_put_back(tmp_path: Path, exits: list[tuple[object, ...]]) -> None:
    knob = tmp_path / "min_free_ms"
    knob.write_text("0\n")
    facts = common.hold_freed_memory(knob, 60000)
    assert knob.read_text() == "60000\n"
    assert facts == {"page_reporting_min_free_ms": 60000, "page_reporting_min_free_ms_before": 0}
    [(fn, path, value)] = exits
    fn(path, value)  # type: ignore[operator]  # what atexit would run
    assert knob.read_text() == "0\n"


def test_a_knob_already_holding_long_enough_is_left_alone(tmp_path: Path, exits: list[tuple[object, ...]]) -> None:
    knob = tmp_path / "min_free_ms"
    knob.write_text("90000\n")
    assert common.hold_freed_memory(knob, 60000) == {"page_reporting_min_free_ms": 90000}
    assert knob.read_text() == "90000\n" and not exits


def test_no_knob_is_measured_as_it_is(tmp_path: Path, exits: list[tuple[object, ...]]) -> None:
    assert common.hold_freed_memory(tmp_path / "absent", 60000) == {"page_reporting": "absent"}
    assert not exits


def test_a_knob_that_cannot_be_read_or_written_says_so(tmp_path: Path, exits: list[tuple[object, ...]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "garbled"
    bad.write_text("soon\n")
    assert common.hold_freed_memory(bad, 60000)["page_reporting"].startswith("unreadable: ")
    knob = tmp_path / "min_free_ms"
    knob.write_text("0\n")

    def refuse(self: Path, data: str) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refuse)
    assert common.hold_freed_memory(knob, 60000) == {"page_reporting_min_free_ms": 0,
                                                     "page_reporting": "left as it is: Permission denied"}
    assert not exits


def test_results_carry_what_was_done_and_leave_skips_it(tmp_path: Path, exits: list[tuple[object, ...]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    knob = tmp_path / "min_free_ms"
    knob.write_text("0\n")
    monkeypatch.setattr(common, "PAGE_REPORTING_DELAY", knob)
    monkeypatch.setattr(sys, "argv", ["bench_x", "--out", str(tmp_path)])
    common.parse_args("x")
    doc = json.loads(common.write_results(str(tmp_path), "x", [{"a": 1}]).read_text())
    assert doc["machine"]["page_reporting_min_free_ms"] == common.HOLD_FREED_MS
    assert knob.read_text() == f"{common.HOLD_FREED_MS}\n"
    knob.write_text("0\n")
    monkeypatch.setattr(sys, "argv", ["bench_x", "--out", str(tmp_path), "--page-reporting", "leave"])
    common.parse_args("x")
    doc = json.loads(common.write_results(str(tmp_path), "x", [{"a": 1}]).read_text())
    assert doc["machine"]["page_reporting"] == "left by --page-reporting"
    assert knob.read_text() == "0\n"
