"""Power-on to agent ready of the hello flow over OVMF HTTP Boot, with a TPM vs without, same run.

Reference: `uefi-http` without a TPM (an unmeasured boot: OVMF loads the bootstrap UKI, which
verifies and hands over, no CDI). Ours: `uefi-http` with the device's swtpm (`--tpm`): OVMF
measures into the TPM, the bootstrap derives CDI_1 from the TPM (PCR read, CreatePrimary of the
PCR-policy key, policy session, HMAC, twice), extends PCR 15, and the agent's evidence carries a
fresh quote. Same deployment, same lab, one device each, sequentially; times from QMP `cont` to
the console's `agent ready`, and the bootstrap stage from its start line to its hand-over line;
plus the time of one `GET /attestation` (the quote included) on each. Writes JSON and a table.
`--arch arm64`: the same on AAVMF (qemu-system-aarch64 -machine virt, TCG; the TPM a
tpm-tis-device).

    python3 -m bench.bench_tpm_boot --out out/bench [--arch arm64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import add_memory_option, settle_memory, write_results

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 900


def _t(dev: Any, text: str) -> float | None:
    return next((ln.t for ln in dev.guest.console.lines if text in ln.text), None)


def one(dep: Any, out: Path, tpm: bool) -> dict[str, Any]:
    from qemu.harness.lab import lab

    with lab(dep, out, ["device"], tpm=tpm) as lb:
        dev = lb.add_device("device", firmware="uefi-http")
        lb.power_on()
        lb.wait_ready(TIMEOUT)
        if dev.outcome != "ready":
            raise SystemExit(f"{'tpm' if tpm else 'plain'} boot: {dev.outcome}: {dev.reason}")
        nonce = os.urandom(32).hex()
        t0 = time.perf_counter()
        lb.net.run(["curl", "-sf", "--max-time", "60", "-o", "/dev/null", f"{dev.url}/attestation?nonce={nonce}"],
                   timeout=90, check=True)
        t_evidence = (time.perf_counter() - t0) * 1000
        start, handover, ready = (_t(dev, "bootstrap start"), _t(dev, "bootstrap handover"), _t(dev, "agent ready"))
    return {"boot": ("uefi-http --tpm" if tpm else "uefi-http") + (f" {dep.arch}" if dep.arch != "x86_64" else ""),
            "power_on_to_agent_ready_s": ready,
            "bootstrap_start_to_handover_s": (handover - start) if start is not None and handover is not None else None,
            "evidence_request_ms": t_evidence}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/bench", help="where the JSON goes")
    ap.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                    help="device architecture (arm64: AAVMF on qemu-system-aarch64 -machine virt)")
    add_memory_option(ap)
    args = ap.parse_args()
    settle_memory(args)
    from qemu.harness.deploy import prepare

    work = Path(tempfile.mkdtemp(prefix="bench-tpm-"))
    dep = prepare(REPO / "examples/hello/flow.yaml", work / "work", arch=args.arch)
    rows = [one(dep, work / "plain", False), one(dep, work / "tpm", True)]
    base, tpm = rows[0]["power_on_to_agent_ready_s"], rows[1]["power_on_to_agent_ready_s"]
    rows[1]["ratio_vs_plain"] = tpm / base if base and tpm else None
    write_results(args.out, "tpm_boot" if args.arch == "x86_64" else f"tpm_boot_{args.arch}", rows,
                  {"accel": "tcg", "flow": "examples/hello", "arch": args.arch})


if __name__ == "__main__":
    main()
