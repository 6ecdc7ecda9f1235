"""Cost of private results: sealing a value to the flow owner (cidboot.dataflow.sealing: age,
one X25519 recipient) and the owner opening it, beside signing the value's provenance node
(make_input: what every result costs already), measured in the same run; and the hello flow's
whole agent run (seed, validation, the operation, audit log) with an owner vs without."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from agent.audit import MemoryBlocks
from agent.orchestrator import FlowContext, Orchestrator, load_operations
from bench.common import parse_args, write_results
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import make_input
from cidboot.dataflow.sealing import Owner, open_value, seal_value
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import keys
from cidboot.trust.private.sealed import Identity

REPO = Path(__file__).resolve().parents[1]


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Median microseconds per call over 5 rounds of at least seconds/5 each."""
    rounds = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds / 5:
            fn()
            n += 1
        rounds.append(dt / n * 1e6)
    return statistics.median(rounds)


def hello_run(owner: Owner | None) -> Callable[[], object]:
    import yaml

    doc = yaml.safe_load((REPO / "examples/hello/flow.yaml").read_text())
    flow = DataFlow.from_obj(doc["dataflow"])
    fcid = CID.of(dagcbor.encode(doc["dataflow"]), DAG_CBOR)
    ops = load_operations(flow, REPO / "examples/hello")
    key = keys.generate()

    def run() -> object:
        ctx = FlowContext(flow, fcid, "device", key, doc["placement"], [], owner=owner)
        return asyncio.run(Orchestrator(ctx, ops, MemoryBlocks()).run())

    return run


def main() -> int:
    args = parse_args(__doc__ or "", [("--seconds", {"type": float, "default": 1.0, "help": "per figure"})])
    ident = Identity.generate()
    owner = Owner((ident.recipient,))
    key = keys.generate()
    fcid = CID.of(b"{}", DAG_CBOR)
    rows: list[dict[str, Any]] = []
    for label, value in (("a 20-byte string (hello's result)", "hello, world 1234567"),
                         ("1 KiB bytes", os.urandom(1024)), ("64 KiB bytes", os.urandom(64 << 10))):
        sign = per_call_us(partial(make_input, value=value, definition="d", flow=fcid, parents=[fcid], key=key),
                           args.seconds)
        _c, block, _k = seal_value(value, owner.raw)
        cases: list[tuple[str, Callable[[], object]]] = [
            (f"seal {label} to 1 recipient", partial(seal_value, value, owner.raw)),
            (f"owner opens {label}", partial(open_value, block, [ident]))]
        for op, fn in cases:
            us = per_call_us(fn, args.seconds)
            rows.append({"operation": op, "us_per_value": round(us, 1), "reference": "sign its provenance node",
                         "ref_us": round(sign, 1), "ratio": round(us / sign, 2)})
    plain, sealed = hello_run(None), hello_run(owner)
    times: dict[str, list[float]] = {"plain": [], "sealed": []}
    for _ in range(max(20, int(args.seconds * 60))):  # interleaved: a loaded machine slows both alike
        for name, fn in (("plain", plain), ("sealed", sealed)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    ms, ref = statistics.median(times["sealed"]), statistics.median(times["plain"])
    rows.append({"operation": "hello flow agent run, owner (result sealed)", "us_per_value": round(ms * 1000, 1),
                 "reference": "the same run without an owner", "ref_us": round(ref * 1000, 1),
                 "ratio": round(ms / ref, 2)})
    write_results(args.out, "private_results", rows, {"ratio": "our time / the reference's time (lower is cheaper)",
                                                      "recipient": "X25519 (age)", "signing": "Ed25519 COSE_Sign1"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
