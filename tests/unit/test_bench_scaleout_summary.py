"""bench_scaleout's JSON in the summary: cold vs warm per N, and the "each block once" goal on
bytes pulled from upstream (met at 1.0, failed when a server pulls a block twice); the
references folded in from bench_upstream (straight from the upstream, a slow uplink)."""

from __future__ import annotations

from typing import Any

from bench import summary


def doc(pulled_mb: float) -> dict[str, Any]:
    return {"rows": [
        {"devices": 4, "image_MB": 33.6, "cold_all_ready_s": 9.0, "warm_all_ready_s": 8.5, "cold/warm": 1.059,
         "direct_all_ready_s": 10.0, "warm/direct": 0.85,
         "upstream_MB_cold": pulled_mb, "upstream/image": round(pulled_mb / 33.6, 3)},
        {"devices": "1 over +20 ms", "cold_all_ready_s": 3.4, "direct_all_ready_s": 1.7, "cold/direct": 2.0},
        {"devices": "1 QEMU (warm)", "all_ready_s": 40.0},
        {"devices": "1 QEMU (cold)", "all_ready_s": 44.0, "cold/warm": 1.1},
    ]}


def test_scaleout_rows_and_the_once_goal() -> None:
    rows = {r.name: r for r in summary.BENCHES["bench_scaleout"].rows(doc(33.6))}
    once = rows["4 device(s): bytes pulled from upstream vs image size"]
    assert (once.ratio, once.goal, once.met) == (1.0, "<= 1", True)
    assert rows["4 device(s) all ready: cold boot server (--upstream) vs warm"].ratio == 1.059
    qemu = rows["1 QEMU device power-on to ready: cold boot server (--upstream) vs warm"]
    assert (qemu.ours, qemu.reference, qemu.ratio) == (44.0, 40.0, 1.1)
    direct = rows["4 device(s) all ready: warm boot server vs straight from the upstream gateway"]
    assert (direct.ours, direct.reference, direct.ratio) == (8.5, 10.0, 0.85)
    slow = rows["1 over +20 ms uplink: cold boot server (read-ahead) vs straight over the link"]
    assert (slow.ratio, slow.goal) == (2.0, None)
    twice = {r.name: r for r in summary.BENCHES["bench_scaleout"].rows(doc(67.2))}
    assert twice["4 device(s): bytes pulled from upstream vs image size"].met is False
