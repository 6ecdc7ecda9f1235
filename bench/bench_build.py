"""Image build speed and size: cold and warm `imagebuilder build` of the hello flow (target image)
and of the same flow as an L1 bootstrap image; the size of every layer, compressed and not; what
the initramfs holds (ELF objects, bytecode, sources, kernel modules, other); the compressed size
of the L1 bootstrap initramfs (goal <= 8 MiB) and the warm rebuild time (goal < 2 s).

References measured in the same run: cold build vs `xz -9` of the same uncompressed initramfs
(the compression floor); warm build vs reading + SHA-256 of the finished layers (the floor of
"verify nothing changed"); layer sizes vs the pinned packages they come from; the initramfs as
built vs the same content all in gzip (what the flows' `compression: gzip` alone would give); the
runtime layer's own compression (zstd in the stage flows) vs gzip -9 of the same archive, in
seconds (what a cold build pays for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import parse_args, write_results
from cidboot.trust import keys
from imagebuilder import flowfile
from imagebuilder.cpio import ZSTD_MAGIC, compress, compression_id, decompress, iter_newc
from imagebuilder.lock import lock_path, make_lock

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _build(flow: Path, cache: Path, store: Path) -> tuple[float, dict[str, object]]:
    env = {**os.environ, "CIDBOOT_BUILD_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--json", "--store", str(store)],
                          capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return time.perf_counter() - t0, json.loads(proc.stdout)


def _layer_bytes(cache: Path, res: dict[str, object]) -> dict[str, bytes]:
    """Layer bytes by role, read back from the build cache (matched by CID)."""
    from imagebuilder.layers import layer_cid

    by_cid = {str(layer_cid(p.read_bytes())): p.read_bytes() for p in cache.iterdir() if p.is_file()}
    return {lyr["role"]: by_cid[lyr["cid"]] for lyr in res["layers"]}  # type: ignore[attr-defined]


def _kind(path: str, data: bytes) -> str:
    """What an initramfs member is, for the size breakdown."""
    if data[:4] == b"\x7fELF":
        return "kernel modules" if path.endswith(".ko") else "ELF objects"
    if path.endswith(".pyc"):
        return "bytecode"
    if path.endswith(".py"):
        return "python sources"
    return "other files"


def breakdown(archives: list[bytes]) -> dict[str, int]:
    """Bytes of the initramfs's (uncompressed) newc archives by kind of member."""
    out: dict[str, int] = {}
    for archive in archives:
        for m, data in iter_newc(archive):
            out[_kind(m.path, data)] = out.get(_kind(m.path, data), 0) + len(data)
    return dict(sorted(out.items()))


def main() -> None:
    args = parse_args(__doc__ or "")
    rows: list[dict[str, object]] = []
    notes: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        flows = {}
        for target in ("image", "bootstrap"):
            d = tmp / target
            shutil.copytree(REPO / "examples/hello", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
            text = (d / "flow.yaml").read_text().replace("version: 1\n", f"version: 1\ntarget: {target}\n", 1)
            (d / "flow.yaml").write_text(text)
            keys.write_keypair(keys.generate(), d / "keys/signer-1")
            ff = flowfile.load(d / "flow.yaml")
            lock_path(ff.path).write_text(make_lock(ff).to_json())
            flows[target] = d / "flow.yaml"
        inputs = json.loads(lock_path(flows["image"]).read_text())
        deb_bytes = sum(p["size"] for p in inputs["debs"].values() if not p["name"].startswith("linux-image"))

        for target, flow in flows.items():
            cache, store = tmp / f"cache-{target}", tmp / f"store-{target}"
            cold, res = _build(flow, cache, store)
            warm, res2 = _build(flow, cache, store)
            assert res2["manifest"] == res["manifest"]
            layers = _layer_bytes(cache, res)
            initrd = b"".join(layers[r] for r in ("runtime", "agent", "operations", "config"))
            raw = b"".join(decompress(layers[r]) for r in ("runtime", "agent", "operations", "config"))
            t0 = time.perf_counter()
            xz = subprocess.run(["xz", "-9", "-T1", "-c"], input=raw, capture_output=True, check=True).stdout
            t_xz = time.perf_counter() - t0
            t0 = time.perf_counter()
            for data in layers.values():
                hashlib.sha256(data).digest()
            t_hash = time.perf_counter() - t0
            rows.append({"target": target, "figure": "cold build s", "value": round(cold, 2),
                         "reference": "xz -9 of same initramfs s", "ref": round(t_xz, 2), "ratio": round(cold / t_xz, 2)})
            rows.append({"target": target, "figure": "warm build s", "value": round(warm, 2),
                         "reference": "sha256 of layers s", "ref": round(t_hash, 3), "ratio": round(warm / max(t_hash, 1e-6), 1)})
            for lyr in res["layers"]:  # type: ignore[attr-defined]
                rows.append({"target": target, "figure": f"layer {lyr['role']} bytes", "value": lyr["size"]})
                if lyr["role"] != "kernel":
                    rows.append({"target": target, "figure": f"layer {lyr['role']} uncompressed bytes",
                                 "value": len(decompress(layers[lyr["role"]]))})
            for kind, n in breakdown([decompress(layers[r]) for r in ("runtime", "agent", "operations", "config")]).items():
                rows.append({"target": target, "figure": f"initramfs {kind} bytes", "value": n})
            gz = sum(len(compress(decompress(layers[r]), "gzip")) for r in ("agent", "operations", "config"))
            rt_raw = decompress(layers["runtime"])
            t0 = time.perf_counter()
            gz += len(compress(rt_raw, "gzip"))
            t_gz = time.perf_counter() - t0
            if target == "bootstrap":  # what the runtime's compression costs a cold build, beside gzip's
                method = "zstd" if layers["runtime"][:4] == ZSTD_MAGIC else "gzip"
                t0 = time.perf_counter()
                again = compress(rt_raw, method)
                t_rt = time.perf_counter() - t0
                assert again == layers["runtime"]
                rows.append({"target": target, "figure": f"runtime layer compress s ({compression_id(method)})",
                             "value": round(t_rt, 2), "reference": "gzip -9 of same s", "ref": round(t_gz, 2),
                             "ratio": round(t_rt / t_gz, 2)})
            rows.append({"target": target, "figure": "initramfs compressed MiB", "value": round(len(initrd) / MIB, 2),
                         "reference": "xz -9 of same MiB", "ref": round(len(xz) / MIB, 2),
                         "ratio": round(len(initrd) / len(xz), 3)})
            rows.append({"target": target, "figure": "initramfs all-gzip MiB", "value": round(gz / MIB, 2)})
            rows.append({"target": target, "figure": "initramfs uncompressed MiB", "value": round(len(raw) / MIB, 2),
                         "reference": "runtime .debs MiB", "ref": round(deb_bytes / MIB, 2),
                         "ratio": round(len(raw) / deb_bytes, 3)})
            notes[f"{target}_manifest"] = res["manifest"]
            if target == "bootstrap":
                notes["l1_initramfs_compressed_bytes"] = len(initrd)
                notes["l1_goal_8MiB_met"] = len(initrd) <= 8 * MIB
                notes["warm_rebuild_goal_2s_met"] = warm < 2.0
    write_results(args.out, "build", rows, notes)


if __name__ == "__main__":
    main()
