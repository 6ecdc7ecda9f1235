"""A private image's boot cost: the hello flow in clear and with `encrypt: true`, same run, same
machine, one DICE device each (`python -m qemu.harness boot`), power-on to agent ready per stage,
and in the guest the bootstrap's own figures for the encrypted boot (its `cidboot-stage:
bootstrap keys` console line): the key broker round trip, STREAM decryption with the plaintext
SHA-256 check, and a SHA-256 pass over the same ciphertext (what the CID check of those bytes
costs), as MiB/s. Clear and encrypted boots alternate (--runs pairs); the median is reported.

    python3 -m bench.bench_private_boot --runs 1 --out out/bench
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import add_memory_option, settle_memory, write_results

REPO = Path(__file__).resolve().parent.parent
STAGES = ("firmware", "bootstrap", "image")
# the bootstrap's own timer line: what it spent verifying (and, private, getting keys and decrypting)
WORK_RX = re.compile(r"cidboot: bootstrap: manifest=\S+ .* layers=(?P<layers>[\d.]+)s .*?(?:keys=(?P<keys>[\d.]+)s )?"
                     r"total=(?P<total>[\d.]+)s")


def bootstrap_work(console: str) -> dict[str, float]:
    """From a console log: the bootstrap's fetch of the layers, its key step (0 in clear) and its
    whole work, timed inside the guest (steadier than stage boundaries on a loaded host)."""
    m = WORK_RX.search(console)
    if m is None:
        return {}
    return {"layers_s": float(m["layers"]), "keys_s": float(m["keys"] or 0.0), "total_s": float(m["total"])}


def private_copy(dest: Path) -> Path:
    """examples/hello with `encrypt: true`, outside the repository (keys are made by the harness)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO / "examples/hello", dest, ignore=shutil.ignore_patterns("keys", "__pycache__"))
    doc = yaml.safe_load((dest / "flow.yaml").read_text())
    doc["encrypt"] = True
    (dest / "flow.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest / "flow.yaml"


def boot(flow: Path, out: Path) -> dict[str, Any]:
    """One harness boot; its report.json plus the guest's `bootstrap keys` fields (if any)."""
    t0 = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "qemu.harness", "boot", str(flow), "--devices", "1",
                          "--out", str(out)], cwd=REPO)
    print(f"harness boot {flow}: exit {rc} after {time.monotonic() - t0:.1f} s", flush=True)
    report = json.loads((out / "report.json").read_text())
    dev = report["devices"][0]
    from qemu.harness import timeline

    console = Path(dev["console"])
    text = console.read_text() if console.exists() else ""
    fields = timeline.parse(timeline.read_log(text)).fields
    return {"status": dev["appraisal"]["status"], "outcome": dev["outcome"],
            "stages": {k: float(v) for k, v in dev["boot_timeline"]["stage_seconds"].items()},
            "keys": fields.get("bootstrap keys", {}), "work": bootstrap_work(text)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--runs", type=int, default=1, help="pairs of boots (clear, encrypted); medians reported")
    add_memory_option(ap)
    args = ap.parse_args(argv)
    settle_memory(args)
    out = Path(args.out).resolve()
    work = out / "private-boot"
    work.mkdir(parents=True, exist_ok=True)
    flows = {"clear": REPO / "examples/hello/flow.yaml", "encrypted": private_copy(work / "flow" / "hello")}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in flows}
    for i in range(args.runs):
        for kind, flow in flows.items():
            runs[kind].append(boot(flow, work / f"{kind}-{i}"))
    rows: list[dict[str, Any]] = []
    totals: dict[str, float] = {}
    touched_clear = work_clear = 0.0
    for kind, rs in runs.items():
        good = [r for r in rs if r["outcome"] == "ready" and set(STAGES) <= set(r["stages"])]
        if not good:
            rows.append({"boot": f"hello, {kind}: power-on to agent ready", "seconds": None,
                         "note": "; ".join(f"{r['outcome']} {r['status']}" for r in rs)})
            continue
        for st in STAGES:
            rows.append({"boot": f"hello, {kind}: {st}", "seconds": round(statistics.median(r["stages"][st] for r in good), 2)})
        touched = statistics.median(r["stages"]["bootstrap"] + r["stages"]["image"] for r in good)
        rows.append({"boot": f"hello, {kind}: bootstrap + image (what encryption changes)", "seconds": round(touched, 2),
                     "ratio_vs_clear": round(touched / touched_clear, 3) if kind != "clear" and touched_clear else None})
        if kind == "clear":
            touched_clear = touched
        works = [r["work"] for r in good if r.get("work")]
        if works:
            work = statistics.median(w["total_s"] for w in works)
            rows.append({"boot": f"hello, {kind}: the bootstrap's own work (in-guest timer)", "seconds": round(work, 2),
                         "ratio_vs_clear": round(work / work_clear, 3) if kind != "clear" and work_clear else None})
            if kind == "clear":
                work_clear = work
        totals[kind] = statistics.median(sum(r["stages"].values()) for r in good)
        rows.append({"boot": f"hello, {kind}: power-on to agent ready", "seconds": round(totals[kind], 2),
                     "appraisal": good[0]["status"],
                     "ratio_vs_clear": round(totals[kind] / totals["clear"], 3) if "clear" in totals else None})
    keys = [r["keys"] for r in runs["encrypted"] if r["keys"]]
    guest: dict[str, Any] = {}
    if keys:
        def med(name: str) -> float:
            return statistics.median(float(k[name]) for k in keys)

        guest = {"layers": int(keys[0]["layers"]), "ciphertext_bytes": int(keys[0]["bytes"]),
                 "sha256_bytes": int(keys[0].get("sha256_bytes", 0)),
                 "broker_s": med("broker_s"), "decrypt_s": med("decrypt_s"), "sha256_s": med("sha256_s"),
                 "decrypt_mibps": med("decrypt_mibps"), "sha256_mibps": med("sha256_mibps")}
        rows += [{"boot": "guest: key broker round trip (challenge + request)", "seconds": round(guest["broker_s"], 3)},
                 {"boot": f"guest: decrypt {guest['ciphertext_bytes'] / 2**20:.1f} MiB (STREAM + plaintext SHA-256)",
                  "seconds": round(guest["decrypt_s"], 3), "mib_per_s": guest["decrypt_mibps"]},
                 {"boot": f"guest: SHA-256 of {guest['sha256_bytes'] / 2**20:.1f} MiB of that ciphertext (the CID check)",
                  "seconds": round(guest["sha256_s"], 3), "mib_per_s": guest["sha256_mibps"],
                  # time per byte, decryption over SHA-256 (the SHA-256 figure is over a sample of the bytes)
                  "ratio_decrypt_vs_sha256": round(guest["sha256_mibps"] / guest["decrypt_mibps"], 2)
                  if guest["decrypt_mibps"] else None}]
    write_results(str(out), "bench_private_boot", rows, {"runs": runs, "guest": guest})
    return 0 if totals.keys() == flows.keys() else 1


if __name__ == "__main__":
    sys.exit(main())
