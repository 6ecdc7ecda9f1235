"""`make bench`'s summary: every bench's JSON mapped to {name, ours, reference, unit, ratio, goal,
met} rows, goals judged from the ratio, and a bench that produced nothing reported as such
(never silently dropped, never a pass)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bench import run_all, summary
from bench.common import write_results

IMPORT_ROWS = [
    {"file_MiB": 16, "cid_version": 0, "same_cid": True, "ours_MBps": 400.0, "kubo_MBps": 100.0, "ours/kubo": 4.0},
    {"file_MiB": 16, "cid_version": 1, "same_cid": True, "ours_MBps": 400.0, "kubo_MBps": 100.0, "ours/kubo": 4.0},
    {"file_MiB": 256, "cid_version": 0, "same_cid": True, "ours_MBps": 300.0, "kubo_MBps": 450.0,
     "ours/kubo": 0.667, "ratio_min": 0.6, "ratio_max": 0.7, "ours_peak_rss_MiB": 19.4},
    {"file_MiB": 256, "cid_version": 1, "same_cid": True, "ours_MBps": 900.0, "kubo_MBps": 600.0, "ours/kubo": 1.5,
     "ratio_min": 1.4, "ratio_max": 1.6, "ours_peak_rss_MiB": 19.3},
]
for _r in IMPORT_ROWS[:2]:
    _r["ours_peak_rss_MiB"] = 19.2

SAMPLES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "import": (IMPORT_ROWS, {}),
    "fetch": ([
        {"file_MiB": 16, "plain_http_MBps": 500.0, "ours_from_our_gw_MBps": 50.0, "ours_from_kubo_gw_MBps": 40.0,
         "ours/plain": 0.1, "our_gw/kubo_gw": 1.25, "client_rss_MiB_our_gw": 30.0, "client_rss_MiB_kubo_gw": 30.0},
        {"file_MiB": 256, "plain_http_MBps": 1000.0, "ours_from_our_gw_MBps": 270.0, "ours_from_kubo_gw_MBps": 100.0,
         "ours/plain": 0.27, "our_gw/kubo_gw": 2.7, "client_rss_MiB_our_gw": 60.0, "client_rss_MiB_kubo_gw": 61.0,
         "plain_http_fsync_MBps": 300.0, "ours/plain_fsync": 0.9, "ours_client_cpu_s": 0.45,
         "ours_gateway_cpu_s": 0.35, "plain_client_cpu_s": 0.25, "plain_server_cpu_s": 0.08,
         "ours_cpu_s": 0.8, "plain_cpu_s": 0.33, "plain_cpu/ours_cpu": 0.413},
    ], {}),
    "bench_tftp": ([
        {"client": "c", "blksize": 512, "windowsize": 1, "ours_MiB_s": 12.9, "tftpd-hpa_MiB_s": 20.7, "ours/hpa": 0.623,
         "ratio_min": 0.6, "ratio_max": 0.7, "cpu_us_blk_ours": 4.0, "cpu_us_blk_tftpd-hpa": 4.2, "cpu ours/hpa": 0.952},
        {"client": "c", "blksize": 1468, "windowsize": 1, "ours_MiB_s": 62.0, "tftpd-hpa_MiB_s": 62.0, "ours/hpa": 1.0},
        {"client": "c", "blksize": 1468, "windowsize": 8, "ours_MiB_s": 74.5, "tftpd-hpa_MiB_s": 59.2, "ours/hpa": 1.26},
        {"client": "python", "blksize": 1468, "windowsize": 1, "ours_MiB_s": 50.0, "tftpd-hpa_MiB_s": 40.0,
         "ours/hpa": 1.25},
    ], {"size_mib": 16}),
    "bench_dhcp": ([
        {"server": "ours (lease file)", "exchanges": 2000, "failed": 0, "exchanges_s": 289.0, "vs_dnsmasq": 0.404},
        {"server": "ours (in memory)", "exchanges": 2000, "failed": 0, "exchanges_s": 582.0, "vs_dnsmasq": 0.814},
        {"server": "dnsmasq", "exchanges": 2000, "failed": 0, "exchanges_s": 715.0, "vs_dnsmasq": 1.0},
    ], {}),
    "bench_boot": ([
        {"boot": "plain iPXE + busybox (reference)", "seconds": 5.54},
        {"boot": "ours: firmware", "seconds": 8.0},
        {"boot": "ours: power-on to agent ready", "seconds": 24.3, "ratio_vs_reference": 4.39},
    ], {"accel": "tcg"}),
    "build": ([
        {"target": "bootstrap", "figure": "cold build s", "value": 40.0, "reference": "xz -9 of same initramfs s",
         "ref": 10.0, "ratio": 4.0},
        {"target": "bootstrap", "figure": "warm build s", "value": 1.5, "reference": "sha256 of layers s",
         "ref": 0.01, "ratio": 150.0},
        {"target": "bootstrap", "figure": "layer runtime bytes", "value": 123},
        {"target": "bootstrap", "figure": "initramfs compressed MiB", "value": 9.0, "reference": "xz -9 of same MiB",
         "ref": 8.5, "ratio": 1.059},
    ], {}),
    "cose": ([{"operation": "Ed25519 COSE_Sign1 sign", "ops_per_s": 5000, "us_per_op": 200.0,
               "reference": "bare Ed25519 sign", "ref_ops_per_s": 10000, "slowdown_vs_ref": 2.0}], {}),
    "trust": ([
        {"operation": "bare cryptography Ed25519 verify (reference)", "ops_per_s": 8000, "us_per_op": 125.0, "vs_bare": 1.0},
        {"operation": "appraisal, 3-layer DICE chain (goal < 1000 us)", "ops_per_s": 500, "us_per_op": 2000.0,
         "vs_bare": 16.0},
        {"operation": "appraisal, TPM quote + 38-event OVMF log (goal < 5000 us)", "ops_per_s": 400,
         "us_per_op": 2500.0, "vs_bare": 20.0},
    ], {}),
    "bench_agent": ([
        {"case": "chain of 200 ops, validation off", "per_op_ms": 1.0},
        {"case": "chain of 200 ops, validation on", "per_op_ms": 1.5, "ratio_vs_off": 1.5},
        {"case": "DFFML 0.4.0 MemoryOrchestrator, same chain", "per_op_ms": 3.0, "ratio_vs_off": 3.0},
    ], {}),
    "tpm_boot": ([
        {"boot": "uefi-http", "power_on_to_agent_ready_s": 20.0},
        {"boot": "uefi-http --tpm", "power_on_to_agent_ready_s": 25.0, "ratio_vs_plain": 1.25},
    ], {"accel": "tcg"}),
    "bench_pxe200": ([
        {"run": "1 client alone", "clients": 1, "failures": 0, "total_s": 0.7, "total_vs_alone": 1.0},
        {"run": "200 clients at once", "clients": 200, "failures": 0, "total_s": 35.0, "total_vs_alone": 50.0},
    ], {}),
}
ALL = sorted(b.stem for b in summary.BENCHES.values() if b.stem != "bench_cluster")


def write_samples(out: Path, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    for name, (rows, notes) in SAMPLES.items():
        if name not in skip:
            write_results(str(out), name, rows, notes)


def by_name(rows: list[summary.Row]) -> dict[str, summary.Row]:
    return {r.name: r for r in rows}


def test_every_sample_maps_to_rows_with_ratio_goal_and_verdict(tmp_path: Path) -> None:
    write_samples(tmp_path)
    rows = by_name(summary.build(tmp_path, ALL))
    v0 = rows["UnixFS import CIDv0 vs ipfs add --only-hash, 256 MiB"]
    assert (v0.ours, v0.reference, v0.unit, v0.ratio, v0.goal, v0.met) == (300.0, 450.0, "MB/s", 0.667, ">= 1", False)
    assert v0.spread == [0.6, 0.7]
    v1 = rows["UnixFS import CIDv1 vs ipfs add --only-hash, 256 MiB"]
    assert (v1.ratio, v1.goal, v1.met) == (1.5, ">= 1.3", True)
    small = rows["UnixFS import CIDv0 vs ipfs add --only-hash, 16 MiB"]
    assert (small.goal, small.met) == (None, None)  # Kubo's start-up dominates: no goal, no pass
    rss = rows["import peak RSS, 256 MiB vs 16 MiB"]
    assert (rss.ours, rss.reference, rss.met) == (19.4, 19.2, True)
    fetch = rows["verified fetch into the store vs plain HTTP download, 256 MiB"]
    assert (fetch.ratio, fetch.goal, fetch.met, fetch.moonshot, fetch.moonshot_met) == (0.27, ">= 0.5", False, ">= 0.9", False)
    assert rows["verified fetch into the store vs plain HTTP download, 16 MiB"].goal is None
    durable = rows["verified fetch into the store vs plain HTTP download + fdatasync, 256 MiB"]
    assert (durable.ratio, durable.goal) == (0.9, None)  # context, beside the goal row
    assert "verified fetch into the store vs plain HTTP download + fdatasync, 16 MiB" not in rows  # no figure, no row
    cpu_row = rows["verified fetch vs plain HTTP download, MB per CPU second of both sides, 256 MiB"]
    assert (cpu_row.ours, cpu_row.reference, cpu_row.ratio, cpu_row.goal) == (335.5, 813.4, 0.413, None)  # context
    assert "verified fetch vs plain HTTP download, MB per CPU second of both sides, 16 MiB" not in rows
    assert rows["fetch client peak RSS, 256 MiB vs 16 MiB"].met is False  # 60 vs 30 MiB: not flat
    tftp = rows["TFTP 16 MiB vs tftpd-hpa, blksize 512, no windowsize, C client"]
    assert (tftp.ratio, tftp.met, tftp.spread) == (0.623, False, [0.6, 0.7])
    cpu = rows["TFTP server CPU per block vs tftpd-hpa, blksize 512, no windowsize (<= 1: no more work)"]
    assert (cpu.ours, cpu.reference, cpu.ratio, cpu.goal, cpu.met) == (4.0, 4.2, 0.952, None, None)
    assert "TFTP server CPU per block vs tftpd-hpa, blksize 1468, no windowsize (<= 1: no more work)" not in rows
    assert rows["TFTP 16 MiB vs tftpd-hpa, blksize 1468, no windowsize, C client"].met is True  # 1.0 >= 1.0
    win = rows["TFTP 16 MiB vs tftpd-hpa, blksize 1468, windowsize 8 (tftpd-hpa: none), C client"]
    assert (win.ratio, win.goal, win.met) == (1.26, None, None)
    # the Python client's own per-block cost pulls ratios towards 1: listed, never judged
    py = rows["TFTP 16 MiB vs tftpd-hpa, blksize 1468, no windowsize, Python client"]
    assert (py.ratio, py.goal, py.met) == (1.25, None, None)
    dhcp = rows["DHCP exchanges/s vs dnsmasq (leases persisted), ours (lease file)"]
    assert (dhcp.ours, dhcp.reference, dhcp.ratio, dhcp.met) == (289.0, 715.0, 0.404, False)
    assert rows["DHCP exchanges/s vs dnsmasq (leases persisted), ours (in memory)"].goal is None
    boot = rows["boot (tcg) ours: power-on to agent ready vs plain iPXE + busybox"]
    assert (boot.ours, boot.reference, boot.unit, boot.ratio, boot.goal, boot.met) == (24.3, 5.54, "s", 4.39, "<= 1.5", False)
    cose = rows["COSE Ed25519 COSE_Sign1 sign vs bare Ed25519 sign"]
    assert (cose.ratio, cose.goal, cose.met) == (0.5, None, None)  # ours / reference, in ops/s
    assert rows["trust appraisal, 3-layer DICE chain vs 1000 us budget"].met is False
    tpm = rows["trust appraisal, TPM quote + 38-event OVMF log vs 5000 us budget"]  # its own budget, not the DICE one
    assert (tpm.ratio, tpm.met) == (0.5, True)
    assert rows["build bootstrap: initramfs compressed vs 8 MiB budget"].met is False
    assert rows["build bootstrap: warm rebuild vs 2 s budget"].met is True
    assert rows["agent chain of 200 ops: validation on vs off"].met is True
    assert rows["agent (validation off) vs DFFML 0.4.0 MemoryOrchestrator, same chain"].ratio == pytest.approx(1 / 3, abs=1e-3)
    assert rows["PXE 200 clients at once vs 1 client alone (total s)"].ratio == 50.0
    # the one goal figure no bench produces yet is listed, not dropped
    dag = rows["verified fetch vs ipfs dag import of the same CAR, 256 MiB"]
    assert (dag.status, dag.goal, dag.met) == ("missing", ">= 1", None)
    for r in rows.values():
        if r.goal is None:
            assert r.met is None, r.name
        if r.ours is not None and r.reference and r.status == "ok":
            assert r.ratio == pytest.approx(r.ours / r.reference, rel=0.02), r.name


def test_missing_bench_result_is_reported_as_missing_not_skipped(tmp_path: Path) -> None:
    write_samples(tmp_path, skip={"bench_dhcp", "cose"})
    rows = summary.build(tmp_path, ALL)
    dhcp = [r for r in rows if r.bench == "bench_dhcp"]
    assert [(r.status, r.goal, r.met) for r in dhcp] == [("missing", ">= 0.8", None)]
    assert "no bench_dhcp.json" in (dhcp[0].note or "")
    cose = [r for r in rows if r.bench == "bench_cose"]
    assert [(r.name, r.status, r.met) for r in cose] == [("bench_cose: no result", "missing", None)]
    text = summary.table(rows)
    assert "MISSING" in text and "not measured" in text


def test_failed_skipped_and_stale_results_never_count_as_met(tmp_path: Path) -> None:
    write_samples(tmp_path)
    old = time.time() - 3600
    os.utime(tmp_path / "import.json", (old, old))
    rows = summary.build(tmp_path, ALL, failed=["bench_tftp"], skipped={"bench_boot": "skipped by --quick"},
                         since=time.time() - 60)
    tftp = [r for r in rows if r.bench == "bench_tftp"]
    assert {(r.status, r.met) for r in tftp} == {("failed", None)} and len(tftp) == 2
    boot = [r for r in rows if r.bench == "bench_boot"]
    assert [(r.status, r.goal, r.met) for r in boot] == [("skipped", "<= 1.5", None)]
    imp = [r for r in rows if r.bench == "bench_import"]
    assert imp and all(r.status == "stale" and r.met is None for r in imp)
    assert all(r.status == "ok" for r in rows if r.bench == "bench_fetch" and "dag import" not in r.name)


def test_unreadable_or_reshaped_result_is_reported_not_crashing(tmp_path: Path) -> None:
    write_samples(tmp_path)
    (tmp_path / "bench_dhcp.json").write_text(json.dumps({"rows": [{"label": "renamed key"}]}))
    (tmp_path / "fetch.json").write_text("{not json")
    rows = summary.build(tmp_path, ALL)
    assert {r.status for r in rows if r.bench == "bench_dhcp"} == {"unreadable"}
    fetch = [r for r in rows if r.bench == "bench_fetch"]
    assert {r.status for r in fetch} == {"unreadable"} and len(fetch) == 3  # its three goal figures


def test_our_wrong_cid_voids_the_import_figure(tmp_path: Path) -> None:
    rows = [dict(r) for r in IMPORT_ROWS]
    rows[2]["same_cid"] = False
    write_results(str(tmp_path), "import", rows)
    got = by_name(summary.build(tmp_path, ["bench_import"]))["UnixFS import CIDv0 vs ipfs add --only-hash, 256 MiB"]
    assert (got.status, got.met) == ("failed", None)


def test_undeclared_results_and_benches_are_listed(tmp_path: Path) -> None:
    write_results(str(tmp_path), "bench_new_thing", [{"x": 1}])
    rows = summary.build(tmp_path, ["bench_unknown"])
    assert {(r.name, r.status) for r in rows} == {
        ("bench_unknown: no summary declaration in bench/summary.py", "undeclared"),
        ("bench_new_thing.json: no summary declaration in bench/summary.py", "undeclared"),
    }


def test_summary_json_has_the_documented_keys(tmp_path: Path) -> None:
    write_samples(tmp_path)
    summary.write(summary.build(tmp_path, ALL), tmp_path / "summary.json")
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert isinstance(doc, list) and doc
    for row in doc:
        assert {"name", "ours", "reference", "unit", "ratio", "goal", "met"} <= set(row)


def test_goal_with_nothing_measured_is_neither_pass_nor_fail() -> None:
    g = summary.Goal(">=", 1.0)
    assert (g.met(None), g.met(float("nan")), g.met(1.0), g.met(0.99)) == (None, None, True, False)
    assert summary.Goal("<=", 1.5).met(1.6) is False
    with pytest.raises(ValueError):
        summary.Goal(">", 1.0)


def test_run_all_quick_skips_slow_benches_and_summarises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []

    def fake_call(cmd: list[str]) -> int:
        calls.append(cmd)
        if cmd[2] == "bench.bench_import":
            write_results(str(tmp_path), "import", IMPORT_ROWS)
            return 0
        return 3  # bench_tftp fails

    monkeypatch.setattr(run_all, "discover", lambda: ["bench_build", "bench_import", "bench_tftp"])
    monkeypatch.setattr(run_all.subprocess, "call", fake_call)
    monkeypatch.setattr(run_all, "hold_freed_memory", lambda: {"page_reporting_min_free_ms": 60000})  # not this VM's
    rc = run_all.main(["--out", str(tmp_path), "--quick"])
    assert rc == 1  # a bench failed
    assert [c[2] for c in calls] == ["bench.bench_import", "bench.bench_tftp"]  # build skipped
    assert calls[0][-6:] == ["--page-reporting", "hold", "--size-mib", "64", "--repeat", "1"]
    doc = json.loads((tmp_path / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in doc}
    assert status["bench_build: no result"] == "skipped"
    assert status["TFTP 16 MiB vs tftpd-hpa, blksize 1468, no windowsize, C client"] == "failed"
    assert status["UnixFS import CIDv0 vs ipfs add --only-hash, 256 MiB"] == "ok"
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["quick"] is True and set(run["seconds"]) == {"bench_import", "bench_tftp", "total"}
    assert run["memory"] == {"page_reporting_min_free_ms": 60000}
    out = capsys.readouterr().out
    assert "goals met:" in out and "SKIPPED" in out and "FAILED" in out


def test_every_bench_script_has_a_summary_declaration() -> None:
    """`make bench` runs every bench/bench_*.py; each needs a declaration here, or its figures
    show up as UNDECLARED (bench_tpm_boot did) instead of rows with a reference."""
    from bench import run_all

    assert set(run_all.discover()) <= set(summary.BENCHES), set(run_all.discover()) - set(summary.BENCHES)


def test_tpm_boot_row(tmp_path: Path) -> None:
    write_samples(tmp_path)
    rows = by_name(summary.build(tmp_path, ["bench_tpm_boot"]))
    tpm = rows["boot (tcg) uefi-http with a TPM vs without, power-on to agent ready"]
    assert (tpm.ours, tpm.reference, tpm.ratio, tpm.goal) == (25.0, 20.0, 1.25, None)
