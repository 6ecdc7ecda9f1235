"""Issue 16 #4: vetoes, refusals and operation errors reach the harness's report.json and summary,
with the input concerned (definition, producer, CID), read from the agent's audit log."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from agent.audit import AuditLog, MemoryBlocks
from cidboot.dataflow.provenance import make_input
from cidboot.ipld.cid import CID, RAW
from cidboot.trust import keys
from cidboot.trust.cose_key import raw_public_bytes
from qemu.harness import problems, timeline
from qemu.harness.commands import boot
from qemu.harness.vm import ConsoleLine

FLOW = CID.of(b"the flow", RAW)


def _audit_with_a_veto_and_an_error() -> tuple[AuditLog, MemoryBlocks, CID, str]:
    store = MemoryBlocks()
    key = keys.generate()
    seed, block = make_input(value=3, definition="count", flow=FLOW, parents=[FLOW], key=key)
    store.put(seed, block)
    log = AuditLog(key, store)
    log.record("run", "sample on 1 validated input(s)", operation="sample", inputs=[seed])
    log.record("veto", "policy never-negate vetoes negate", operation="negate", inputs=[seed])
    log.record("error", "boom raised RuntimeError: sensor unplugged", operation="boom", inputs=[seed])
    return log, store, seed, raw_public_bytes(key.public_key()).hex()


def test_vetoes_and_errors_from_the_audit_log_name_their_inputs() -> None:
    log, store, seed, producer = _audit_with_a_veto_and_an_error()
    found = problems.audit_problems(log.head, store.get)
    assert [(p["decision"], p["operation"]) for p in found] == [("veto", "negate"), ("error", "boom")]
    (inp,) = found[0]["inputs"]
    assert inp == {"cid": str(seed), "definition": "count", "operation": "seed", "producer": producer}


def test_vetoes_and_refusals_appear_in_harness_summary(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    log, store, seed, producer = _audit_with_a_veto_and_an_error()
    report: dict[str, Any] = {
        "manifest_cid": "bafyreiexample", "flow": "hello", "accel": "tcg",
        "devices": [{"name": "device-0", "role": "device", "boot": "measured", "outcome": "ready", "reason": "",
                     "appraisal": {"status": "affirming", "reasons": []}, "flow_results": {"results": {}},
                     "problems": problems.audit_problems(log.head, store.get),
                     "boot_timeline": {"stage_seconds": {}, "problems": []}}]}
    monkeypatch.setattr(boot, "boot", lambda args: report)
    boot.run(argparse.Namespace(json=False, out=Path("o")))
    out = capsys.readouterr().out
    assert f"veto: policy never-negate vetoes negate [input count by {producer[:16]} (seed) {seed}]" in out
    assert "error: boom raised RuntimeError: sensor unplugged" in out


def test_console_audit_lines_are_timeline_problems() -> None:
    tl = timeline.parse([ConsoleLine(1.0, "cidboot: audit: veto: policy never-negate vetoes negate"),
                         ConsoleLine(2.0, "cidboot: audit: error: boom raised RuntimeError: x"),
                         ConsoleLine(3.0, "cidboot: refused: layer bafy...: hash mismatch")])
    assert [(k, r) for _, k, r in tl.problems] == [("veto", "policy never-negate vetoes negate"),
                                                   ("error", "boom raised RuntimeError: x"),
                                                   ("refused", "layer bafy...: hash mismatch")]
