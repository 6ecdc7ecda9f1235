"""One table of every ratio `make bench` measured, and out/bench/summary.json to compare runs.

Each bench writes out/bench/<name>.json in its own shape; the declarations here (one small
function per bench, `BENCHES`) map that JSON to summary rows:

    {name, ours, reference, unit, ratio, goal, met, bench, status, spread?, moonshot?, note?}

`ratio` is always ours / reference in `unit` (for a rate higher is better, for seconds lower
is better, and `goal` says which: ">= 1.0", "<= 1.5"). Goals come from issue 13's table (and
the few a bench states itself, named in `note`); a figure with no goal has goal and met null,
never a pass. A goal figure the bench did not produce is a row with status "missing" (or
"failed", "stale", "skipped") and met null, so a run that lost a bench cannot look better
than one that measured it. The declarations sit here, not in the bench scripts, so building
the summary imports nothing heavy (QEMU harness, Kubo fixtures) and works on old JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class Goal:
    """`ratio op value`, e.g. Goal(">=", 1.0): the ratio must be at least 1.0."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"goal operator must be >= or <=, got {self.op!r}")

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None or not math.isfinite(ratio):
            return None  # nothing measured: neither a pass nor a fail
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


AT_LEAST_1 = Goal(">=", 1.0)
FLAT = Goal("<=", 1.1)  # "flat" peak RSS: the big file's peak within 10% of the small file's
WITHIN_BUDGET = Goal("<=", 1.0)  # a bench's own absolute goal: ours / budget at most 1


@dataclass
class Row:
    name: str
    ours: float | None
    reference: float | None
    unit: str
    ratio: float | None
    goal: str | None
    met: bool | None
    bench: str
    status: str = "ok"  # ok | missing | failed | stale | skipped | undeclared | unreadable
    spread: list[float] | None = None  # [min, max] of the bench's repeated ratios, when it has them
    moonshot: str | None = None
    moonshot_met: bool | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k in ("ours", "reference", "ratio", "goal", "met")}


def figure(bench: str, name: str, ours: float | None, reference: float | None, unit: str, *,
           goal: Goal | None = None, moonshot: Goal | None = None, ratio: float | None = None,
           spread: Iterable[float] | None = None, note: str | None = None) -> Row:
    """A measured row; `ratio` defaults to ours / reference (give the bench's own when it is
    more precise than its rounded figures)."""
    if ratio is None and ours is not None and reference:
        ratio = ours / reference
    if ratio is not None:
        ratio = round(float(ratio), 3)
    return Row(name, ours, reference, unit, ratio, str(goal) if goal else None, goal.met(ratio) if goal else None,
               bench, spread=[float(x) for x in spread] if spread is not None else None,
               moonshot=str(moonshot) if moonshot else None,
               moonshot_met=moonshot.met(ratio) if moonshot else None, note=note)


def absent(bench: str, name: str, unit: str, status: str, why: str, *, goal: Goal | None = None,
           moonshot: Goal | None = None) -> Row:
    """A figure that should be there and is not: goal kept, met null."""
    return Row(name, None, None, unit, None, str(goal) if goal else None, None, bench, status=status,
               moonshot=str(moonshot) if moonshot else None, note=why)


# -- one declaration per bench ------------------------------------------------------------


def _largest(rows: list[Doc], key: str) -> int | None:
    sizes = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return max(sizes) if sizes else None


def _import(doc: Doc) -> list[Row]:
    rows, b = doc["rows"], "bench_import"
    big = _largest(rows, "file_MiB")
    out: list[Row] = []
    goals = {0: AT_LEAST_1, 1: Goal(">=", 1.3)}
    for version, goal in goals.items():
        name = "UnixFS import CIDv{} vs ipfs add --only-hash, {} MiB"
        mine = [r for r in rows if r.get("cid_version") == version]
        if not mine:
            out.append(absent(b, name.format(version, "256"), "MB/s", "missing",
                              f"import.json has no CIDv{version} row", goal=goal))
        for r in sorted(mine, key=lambda r: r["file_MiB"]):
            spread = [r["ratio_min"], r["ratio_max"]] if "ratio_min" in r and "ratio_max" in r else None
            # the goal is judged where Kubo's ~0.1 s process start is amortised: the largest file
            row = figure(b, name.format(version, r["file_MiB"]), r["ours_MBps"], r["kubo_MBps"], "MB/s",
                         goal=goal if r["file_MiB"] == big else None, ratio=r.get("ours/kubo"), spread=spread)
            if not r.get("same_cid", True):  # a faster wrong answer is no figure at all
                row.status, row.met, row.note = "failed", None, "our CID differs from Kubo's"
            out.append(row)
    small = min((r["file_MiB"] for r in rows), default=None)
    if big is not None and small is not None and big != small:
        rss = {s: max(r["ours_peak_rss_MiB"] for r in rows if r["file_MiB"] == s) for s in (small, big)}
        out.append(figure(b, f"import peak RSS, {big} MiB vs {small} MiB", rss[big], rss[small], "MiB", goal=FLAT))
    else:
        out.append(absent(b, "import peak RSS, 256 MiB vs 16 MiB", "MiB", "missing", "needs two file sizes", goal=FLAT))
    return out


def _fetch(doc: Doc) -> list[Row]:
    rows, b = doc["rows"], "bench_fetch"
    big, small = _largest(rows, "file_MiB"), min((r["file_MiB"] for r in rows), default=None)
    out: list[Row] = []
    plain_goal, dag_goal = Goal(">=", 0.5), AT_LEAST_1
    for r in sorted(rows, key=lambda r: r["file_MiB"]):
        mib = r["file_MiB"]
        is_big = mib == big
        out.append(figure(b, f"verified fetch into the store vs plain HTTP download, {mib} MiB",
                          r["ours_from_our_gw_MBps"], r["plain_http_MBps"], "MB/s", ratio=r.get("ours/plain"),
                          goal=plain_goal if is_big else None, moonshot=Goal(">=", 0.9) if is_big else None))
        if "plain_http_fsync_MBps" in r:  # context: the reference made durable, as our fetch returns durable
            out.append(figure(b, f"verified fetch into the store vs plain HTTP download + fdatasync, {mib} MiB",
                              r["ours_from_our_gw_MBps"], r["plain_http_fsync_MBps"], "MB/s",
                              ratio=r.get("ours/plain_fsync")))
        if "ours_cpu_s" in r:  # context: bytes per CPU second of both sides (client + server), which
            mb = mib * 1024 * 1024 / 1e6  # other work on the cores moves less than it moves the wall clock
            out.append(figure(b, f"verified fetch vs plain HTTP download, MB per CPU second of both sides, {mib} MiB",
                              round(mb / r["ours_cpu_s"], 1), round(mb / r["plain_cpu_s"], 1), "MB/CPU-s",
                              ratio=r["plain_cpu/ours_cpu"]))
        if "ours_from_kubo_gw_MBps" in r:
            out.append(figure(b, f"verified fetch from our gateway vs from Kubo's gateway, {mib} MiB",
                              r["ours_from_our_gw_MBps"], r["ours_from_kubo_gw_MBps"], "MB/s",
                              ratio=r.get("our_gw/kubo_gw")))
        if "ours_from_static_car_MBps" in r:  # the client alone: the same CAR from a static file server
            out.append(figure(b, f"verified fetch of a static CAR file vs plain HTTP download, {mib} MiB",
                              r["ours_from_static_car_MBps"], r["plain_http_MBps"], "MB/s",
                              ratio=r.get("static_car/plain")))
        dag = next((k for k in r if "dag_import" in k and k.endswith("MBps")), None)
        if dag is not None:
            out.append(figure(b, f"verified fetch vs ipfs dag import of the same CAR, {mib} MiB",
                              r["ours_from_our_gw_MBps"], r[dag], "MB/s", goal=dag_goal if is_big else None))
        elif is_big:
            out.append(absent(b, f"verified fetch vs ipfs dag import of the same CAR, {mib} MiB", "MB/s", "missing",
                              "fetch.json has no *dag_import*_MBps figure", goal=dag_goal))
    if big is not None and small is not None and big != small:
        rss = {r["file_MiB"]: r["client_rss_MiB_our_gw"] for r in rows}
        out.append(figure(b, f"fetch client peak RSS, {big} MiB vs {small} MiB", rss[big], rss[small], "MiB", goal=FLAT))
    else:
        out.append(absent(b, "fetch client peak RSS, 256 MiB vs 16 MiB", "MiB", "missing", "needs two file sizes",
                          goal=FLAT))
    if not rows:
        out.insert(0, absent(b, "verified fetch into the store vs plain HTTP download, 256 MiB", "MB/s", "missing",
                             "fetch.json has no rows", goal=plain_goal))
    return out


def _tftp(doc: Doc) -> list[Row]:
    """Goals on the C client's lock-step rows (it measures the servers); the Python client's
    rows (older JSON has no "client": those) are listed without a goal: its own per-block cost
    is larger than either server's and pulls the ratio towards 1."""
    rows, b = doc["rows"], "bench_tftp"
    size = doc.get("notes", {}).get("size_mib", "?")
    out: list[Row] = []
    seen = set()
    for r in rows:
        bs, win, client = r["blksize"], r.get("windowsize", 1), r.get("client", "python")
        judged = win == 1 and client == "c"
        if judged:
            seen.add(bs)
        what = "no windowsize" if win == 1 else f"windowsize {win} (tftpd-hpa: none)"
        spread = [r["ratio_min"], r["ratio_max"]] if "ratio_min" in r and "ratio_max" in r else None
        out.append(figure(b, f"TFTP {size} MiB vs tftpd-hpa, blksize {bs}, {what}, {TFTP_CLIENTS[client]}",
                          r["ours_MiB_s"], r["tftpd-hpa_MiB_s"], "MiB/s", ratio=r.get("ours/hpa"),
                          goal=AT_LEAST_1 if judged else None, spread=spread))
        if judged and "cpu ours/hpa" in r:  # context: the servers' own work, which load moves far less
            out.append(figure(b, f"TFTP server CPU per block vs tftpd-hpa, blksize {bs}, no windowsize (<= 1: no more work)",
                              r["cpu_us_blk_ours"], r["cpu_us_blk_tftpd-hpa"], "us"))
        if judged and "blk ours/hpa" in r:  # context: the usual block, without the rare wake-ups delayed by ms
            out.append(figure(b, f"TFTP median time per block vs tftpd-hpa, blksize {bs}, no windowsize (<= 1: no slower)",
                              r["blk_us_ours"], r["blk_us_tftpd-hpa"], "us"))
    for bs in (512, 1468):  # issue 13: at least tftpd-hpa at both, without windowsize
        if bs not in seen:
            out.append(absent(b, f"TFTP {size} MiB vs tftpd-hpa, blksize {bs}, no windowsize, {TFTP_CLIENTS['c']}",
                              "MiB/s", "missing", "bench_tftp.json has no such row", goal=AT_LEAST_1))
    return out


TFTP_CLIENTS = {"c": "C client", "python": "Python client"}


def _dhcp(doc: Doc) -> list[Row]:
    rows, b = doc["rows"], "bench_dhcp"
    ref = next((r for r in rows if str(r["server"]).startswith("dnsmasq")), None)
    out: list[Row] = []
    goal, moon = Goal(">=", 0.8), AT_LEAST_1
    persisted = 0
    for r in rows:
        label = str(r["server"])
        if not label.startswith("ours") or ref is None:
            continue
        in_memory = "memory" in label
        persisted += not in_memory
        out.append(figure(b, f"DHCP exchanges/s vs dnsmasq (leases persisted), {label}", r["exchanges_s"],
                          ref["exchanges_s"], "exchanges/s", ratio=r.get("vs_dnsmasq"),
                          goal=None if in_memory else goal, moonshot=None if in_memory else moon,
                          note=f"{r['failed']} failed" if r.get("failed") else None))
    if not persisted:
        out.append(absent(b, "DHCP exchanges/s vs dnsmasq (leases persisted)", "exchanges/s", "missing",
                          "no dnsmasq row or no persisted-leases row of ours", goal=goal, moonshot=moon))
    return out


def _boot(doc: Doc) -> list[Row]:
    rows, b = doc["rows"], "bench_boot"
    accel = doc.get("notes", {}).get("accel", "?")
    refs = {str(r["boot"]): r for r in rows if "reference" in str(r.get("boot", ""))}
    first = next(iter(refs.values()), None)
    goal, moon = Goal("<=", 1.5), Goal("<=", 1.0)
    out = []
    for r in rows:
        if r.get("ratio_vs_reference") is None:
            if str(r.get("boot", "")).startswith("ours") and r.get("arch", "x86_64") != "x86_64" \
                    and r.get("seconds") is not None:  # measured, no reference of its arch in the run
                out.append(figure(b, f"boot ({accel}) {r['boot']}", r["seconds"], None, "s", note=r.get("note")))
            continue
        ref = refs.get(str(r.get("reference")), first)  # older files name no reference: the first (iPXE)
        against = str(ref["boot"]).replace(" (reference)", "") if ref else "plain iPXE + busybox"
        out.append(figure(b, f"boot ({accel}) {r['boot']} vs {against}", r["seconds"], ref["seconds"] if ref else None,
                          "s", ratio=r.get("ratio_vs_reference"), goal=goal, moonshot=moon))
    if not out:
        out.append(absent(b, "boot: power-on to agent ready vs plain iPXE + busybox", "s", "missing",
                          "bench_boot.json has no ratio_vs_reference row (reference or our boot missing)",
                          goal=goal, moonshot=moon))
    return out


def _build(doc: Doc) -> list[Row]:
    b = "bench_build"
    out = []
    for r in doc["rows"]:
        if r.get("ratio") is None:
            continue
        fig = str(r["figure"])
        unit = "s" if fig.endswith(" s") else "MiB" if fig.endswith("MiB") else ""
        out.append(figure(b, f"build {r['target']}: {fig.removesuffix(' ' + unit)} vs {r['reference']}",
                          r["value"], r["ref"], unit, ratio=r["ratio"]))
        if r["target"] == "bootstrap" and fig == "initramfs compressed MiB":
            out.append(figure(b, "build bootstrap: initramfs compressed vs 8 MiB budget", r["value"], 8.0, "MiB",
                              goal=WITHIN_BUDGET, note="goal from bench_build"))
        if r["target"] == "bootstrap" and fig == "warm build s":
            out.append(figure(b, "build bootstrap: warm rebuild vs 2 s budget", r["value"], 2.0, "s",
                              goal=WITHIN_BUDGET, note="goal from bench_build"))
    return out


def _cose(doc: Doc) -> list[Row]:
    return [figure("bench_cose", f"COSE {r['operation']} vs {r['reference']}", r["ops_per_s"], r["ref_ops_per_s"], "ops/s")
            for r in doc["rows"]]


def _private(doc: Doc) -> list[Row]:
    return [figure("bench_private", f"{r['operation']} vs {r['reference']}", r["MiB_per_s"], r["ref_MiB_per_s"], "MiB/s")
            for r in doc["rows"]]


def _private_results(doc: Doc) -> list[Row]:
    return [figure("bench_private_results", f"{r['operation']} vs {r['reference']}", r["us_per_value"], r["ref_us"],
                   "us") for r in doc["rows"]]
def _private_boot(doc: Doc) -> list[Row]:
    b, out = "bench_private_boot", []
    rows = {str(r["boot"]): r for r in doc["rows"]}
    clear, enc = rows.get("hello, clear: power-on to agent ready"), rows.get("hello, encrypted: power-on to agent ready")
    if clear and enc:
        out.append(figure(b, "hello power-on to agent ready: encrypted vs clear", enc["seconds"], clear["seconds"], "s",
                          ratio=enc.get("ratio_vs_clear")))
    touched = rows.get("hello, encrypted: bootstrap + image (what encryption changes)")
    touched_ref = rows.get("hello, clear: bootstrap + image (what encryption changes)")
    if touched and touched_ref:
        out.append(figure(b, "hello bootstrap + image stages: encrypted vs clear", touched["seconds"],
                          touched_ref["seconds"], "s", ratio=touched.get("ratio_vs_clear")))
    work, work_ref = (rows.get(f"hello, {k}: the bootstrap's own work (in-guest timer)") for k in ("encrypted", "clear"))
    if work and work_ref:
        out.append(figure(b, "hello bootstrap work (in-guest timer): encrypted vs clear", work["seconds"],
                          work_ref["seconds"], "s", ratio=work.get("ratio_vs_clear")))
    g = doc.get("notes", {}).get("guest") or {}
    if g.get("decrypt_mibps") and g.get("sha256_mibps"):
        out.append(figure(b, "guest layer decryption vs SHA-256 of the same ciphertext (the CID check)",
                          g["decrypt_mibps"], g["sha256_mibps"], "MiB/s"))
    return out


_BUDGET = re.compile(r"\(goal < (\d+) us\)")


def _trust(doc: Doc) -> list[Row]:
    rows, b = doc["rows"], "bench_trust"
    bare = next((r for r in rows if "reference" in r["operation"]), None)
    out = []
    for r in rows:
        if r is bare:
            continue
        out.append(figure(b, f"trust {r['operation']} vs bare Ed25519 verify", r["ops_per_s"],
                          bare["ops_per_s"] if bare else None, "ops/s"))
        budget = _BUDGET.search(r["operation"])
        if budget:  # each appraisal has its own budget in its name: DICE 1000 us, TPM 5000 us
            what = r["operation"][:budget.start()].strip()
            out.append(figure(b, f"trust {what} vs {budget[1]} us budget", r["us_per_op"], float(budget[1]), "us",
                              goal=WITHIN_BUDGET, note="goal from bench_trust"))
    return out


def _agent(doc: Doc) -> list[Row]:
    rows, b = doc["rows"], "bench_agent"
    by_case = {r["case"]: r for r in rows}
    out = []
    for r in rows:
        case = str(r["case"])
        if case.endswith("validation on") and r.get("ratio_vs_off") is not None:
            off = by_case.get(case.removesuffix("on") + "off")
            out.append(figure(b, f"agent {case.removesuffix(', validation on')}: validation on vs off",
                              r["per_op_ms"], off["per_op_ms"] if off else None, "ms/op", ratio=r["ratio_vs_off"],
                              goal=Goal("<=", 2.0), note="goal from bench_agent: validation adds < 2x"))
        elif case.startswith("DFFML") and r.get("ratio_vs_off"):
            ours = r["per_op_ms"] / r["ratio_vs_off"]  # our validation-off time per op, as the bench divided
            out.append(figure(b, f"agent (validation off) vs {case}", ours, r["per_op_ms"], "ms/op"))
    return out


def _pxe200(doc: Doc) -> list[Row]:
    out = []
    for r in doc["rows"]:
        ratio = r.get("total_vs_alone")
        if ratio and str(r["run"]) != "1 client alone":
            out.append(figure("bench_pxe200", f"PXE {r['run']} vs 1 client alone (total s)", r["total_s"],
                              r["total_s"] / ratio, "s", ratio=ratio,
                              note=f"{r['failures']} failures" if r.get("failures") else None))
    return out


def _cluster(doc: Doc) -> list[Row]:
    return [figure("bench_cluster", f"cluster {r['case']} vs ipfs dag import, 1 node", r["MBps"], r["ref_MBps"], "MB/s",
                   ratio=r["ratio"], spread=None)
            for r in doc["rows"] if r.get("ratio") is not None and "(reference)" not in str(r["case"])]


def _scaleout(doc: Doc) -> list[Row]:
    b, out = "bench_scaleout", []
    for r in doc["rows"]:
        n = r["devices"]
        if isinstance(n, int):
            out.append(figure(b, f"{n} device(s) all ready: cold boot server (--upstream) vs warm", r["cold_all_ready_s"],
                              r["warm_all_ready_s"], "s", ratio=r.get("cold/warm")))
            out.append(figure(b, f"{n} device(s): bytes pulled from upstream vs image size", r["upstream_MB_cold"],
                              r["image_MB"], "MB", ratio=r.get("upstream/image"), goal=ONCE))
            if "direct_all_ready_s" in r:  # older JSON: no such reference
                out.append(figure(b, f"{n} device(s) all ready: warm boot server vs straight from the upstream gateway",
                                  r["warm_all_ready_s"], r["direct_all_ready_s"], "s", ratio=r.get("warm/direct")))
        elif r.get("cold/direct") is not None:  # the slow-uplink row
            out.append(figure(b, f"{r['devices']} uplink: cold boot server (read-ahead) vs straight over the link",
                              r["cold_all_ready_s"], r["direct_all_ready_s"], "s", ratio=r["cold/direct"]))
        elif r.get("cold/warm") is not None:  # the QEMU row pair: "1 QEMU (cold)" carries the ratio
            warm = next((w for w in doc["rows"] if w["devices"] == "1 QEMU (warm)"), None)
            out.append(figure(b, "1 QEMU device power-on to ready: cold boot server (--upstream) vs warm",
                              r["all_ready_s"], warm["all_ready_s"] if warm else None, "s", ratio=r["cold/warm"]))
    return out


def _tpm_boot(doc: Doc) -> list[Row]:
    rows = {str(r.get("boot")): r for r in doc["rows"]}
    plain, tpm = rows.get("uefi-http"), rows.get("uefi-http --tpm")
    accel = doc.get("notes", {}).get("accel", "?")
    if plain is None or tpm is None:
        return [absent("bench_tpm_boot", f"boot ({accel}) uefi-http with a TPM vs without", "s", "missing",
                       "tpm_boot.json lacks the plain or the TPM row")]
    return [figure("bench_tpm_boot", f"boot ({accel}) uefi-http with a TPM vs without, power-on to agent ready",
                   tpm.get("power_on_to_agent_ready_s"), plain.get("power_on_to_agent_ready_s"), "s",
                   ratio=tpm.get("ratio_vs_plain"))]


ONCE = Goal("<=", 1.0)  # every block pulled from upstream once, however many devices ask


@dataclass(frozen=True)
class Bench:
    stem: str  # bench/<stem>.py
    result: str  # out/bench/<result>.json
    rows: Callable[[Doc], list[Row]]
    goals: tuple[tuple[str, str, Goal], ...] = field(default=())  # (name, unit, goal): rows when the JSON is not there


BENCHES: dict[str, Bench] = {b.stem: b for b in [
    Bench("bench_agent", "bench_agent", _agent),
    Bench("bench_boot", "bench_boot", _boot, (("boot: power-on to agent ready vs plain iPXE + busybox", "s", Goal("<=", 1.5)),)),
    Bench("bench_build", "build", _build),
    Bench("bench_cluster", "bench_cluster", _cluster),
    Bench("bench_cose", "cose", _cose),
    Bench("bench_dhcp", "bench_dhcp", _dhcp, (("DHCP exchanges/s vs dnsmasq (leases persisted)", "exchanges/s", Goal(">=", 0.8)),)),
    Bench("bench_fetch", "fetch", _fetch, (
        ("verified fetch into the store vs plain HTTP download, 256 MiB", "MB/s", Goal(">=", 0.5)),
        ("verified fetch vs ipfs dag import of the same CAR, 256 MiB", "MB/s", AT_LEAST_1),
        ("fetch client peak RSS, 256 MiB vs 16 MiB", "MiB", FLAT))),
    Bench("bench_import", "import", _import, (
        ("UnixFS import CIDv0 vs ipfs add --only-hash, 256 MiB", "MB/s", AT_LEAST_1),
        ("UnixFS import CIDv1 vs ipfs add --only-hash, 256 MiB", "MB/s", Goal(">=", 1.3)),
        ("import peak RSS, 256 MiB vs 16 MiB", "MiB", FLAT))),
    Bench("bench_private", "private", _private),
    Bench("bench_private_results", "private_results", _private_results),
    Bench("bench_private_boot", "bench_private_boot", _private_boot),
    Bench("bench_pxe200", "bench_pxe200", _pxe200),
    Bench("bench_scaleout", "bench_scaleout", _scaleout, (
        ("4 device(s): bytes pulled from upstream vs image size", "MB", ONCE),)),
    Bench("bench_tpm_boot", "tpm_boot", _tpm_boot),
    Bench("bench_tftp", "bench_tftp", _tftp, (
        ("TFTP 16 MiB vs tftpd-hpa, blksize 512, no windowsize, C client", "MiB/s", AT_LEAST_1),
        ("TFTP 16 MiB vs tftpd-hpa, blksize 1468, no windowsize, C client", "MiB/s", AT_LEAST_1))),
    Bench("bench_trust", "trust", _trust),
]}


def _goal_rows(bench: Bench, status: str, why: str) -> list[Row]:
    if not bench.goals:
        return [absent(bench.stem, f"{bench.stem}: no result", "", status, why)]
    return [absent(bench.stem, name, unit, status, why, goal=goal) for name, unit, goal in bench.goals]


def build(out_dir: Path, expected: Iterable[str], *, failed: Iterable[str] = (), skipped: dict[str, str] | None = None,
          since: float | None = None) -> list[Row]:
    """Summary rows for the benches in `expected` (stems), from the JSON files in `out_dir`.

    `failed`: benches whose process exited non-zero in this run; `skipped`: stem -> why it was
    not run (e.g. --quick); `since`: results older than this (epoch seconds) are stale. Any
    other JSON in out_dir with no declaration is listed as undeclared.
    """
    skipped = skipped or {}
    failed = set(failed)
    rows: list[Row] = []
    claimed = {"summary", "run"}  # run_all's own files
    for stem in expected:
        bench = BENCHES.get(stem)
        if bench is None:
            rows.append(absent(stem, f"{stem}: no summary declaration in bench/summary.py", "", "undeclared",
                               "add a Bench(...) to BENCHES"))
            claimed.add(stem)
            continue
        claimed.add(bench.result)
        path = out_dir / f"{bench.result}.json"
        if stem in skipped:
            rows += _goal_rows(bench, "skipped", skipped[stem])
            continue
        if stem in failed:
            rows += _goal_rows(bench, "failed", f"{stem} exited non-zero in this run")
            continue
        if not path.exists():
            rows += _goal_rows(bench, "missing", f"no {path.name}")
            continue
        try:
            doc = json.loads(path.read_text())
            got = bench.rows(doc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
            rows += _goal_rows(bench, "unreadable", f"{path.name}: {type(e).__name__}: {e}")
            continue
        if since is not None and path.stat().st_mtime < since:
            for r in got:
                r.status, r.met, r.moonshot_met = "stale", None, None
                r.note = f"{path.name} is older than this run" + (f"; {r.note}" if r.note else "")
        rows += got
    for path in sorted(out_dir.glob("*.json")):
        if path.stem not in claimed and path.stem not in {b.result for b in BENCHES.values()}:
            rows.append(absent(path.stem, f"{path.name}: no summary declaration in bench/summary.py", "", "undeclared",
                               "add a Bench(...) to BENCHES"))
    return rows


def write(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def table(rows: list[Row]) -> str:
    """The one table `make bench` prints: every figure, its ratio, goal and verdict."""
    head = ["figure", "ours", "reference", "unit", "ratio", "spread", "goal", "met"]
    lines = [head]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        if r.status != "ok":
            met = r.status.upper()
        spread = f"{r.spread[0]:.2f}-{r.spread[1]:.2f}" if r.spread else ""
        lines.append([r.name, _num(r.ours), _num(r.reference), r.unit, _num(r.ratio), spread, r.goal or "", met])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    goals = [r for r in rows if r.goal]
    n_met = sum(r.met is True for r in goals)
    text.append(f"goals met: {n_met} of {len(goals)}"
                + (f" ({sum(r.met is None for r in goals)} not measured)" if any(r.met is None for r in goals) else ""))
    return "\n".join(text)
