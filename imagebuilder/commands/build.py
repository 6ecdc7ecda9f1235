"""`imagebuilder build flow.yaml`: layers + signed manifest; prints the manifest CID last."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cidboot.cli import human_bytes, print_json
from cidboot.ipld.car import CarWriter
from cidboot.store.blockstore import Blockstore, default_store_path
from imagebuilder.build import BuildError, BuildResult, build, parse_reference
from imagebuilder.cache import prune
from imagebuilder.commands.cache import kind_dir, layer_cache_max
from imagebuilder.commands.inspect import unpinned as unpinned_layers


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("build", help="build a flow into layers and a signed manifest",
                       description="Build FLOW (flow.yaml, pinned by flow.lock beside it) into content-addressed "
                                   "layers and a signed workload manifest; print the manifest CID as the last line.")
    p.add_argument("flow", type=Path)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--store", type=Path, help=f"block store directory (default: $CIDBOOT_STORE or {default_store_path()})")
    where.add_argument("--kubo", metavar="URL", help="publish to a Kubo node's RPC, e.g. http://127.0.0.1:5001")
    where.add_argument("--car", type=Path, metavar="FILE", help="write every block to a CARv1 file (root: the manifest)")
    p.add_argument("--json", action="store_true", help="every CID and size as JSON")
    p.add_argument("--reference", action="append", default=[], metavar="NAME=HEX",
                   help="reference measurement of a stage below this image (NAME firmware or bootstrap, HEX its "
                        "128-hex-digit code hash, e.g. from a firmware/bootstrap build's manifest); repeatable")
    p.add_argument("--uki", metavar="FILE",
                   help="bootstrap flows: also assemble the bootstrap as a Unified Kernel Image (systemd-boot-efi's "
                        "stub + kernel + initrd + cmdline + os-release; UEFI firmware loads it directly by PXE or "
                        "HTTP Boot), write it to FILE (a directory, or a name ending in /: into it as "
                        "bootstrap-x86_64.efi) and add its blocks "
                        "to the destination, pinned")
    p.add_argument("--flow-secret", type=Path, metavar="FILE",
                   help="flows with `encrypt: true`: the flow secret every layer key is derived from "
                        "(default: beside the first signing key, KEYDIR/NAME.flow.secret; make one with "
                        "`imagebuilder keygen --flow-secret FILE`); refused for a flow without `encrypt: true`")
    p.set_defaults(func=run)


def _write(res: BuildResult, args: argparse.Namespace) -> None:
    blocks = sorted(res.blocks.items(), key=lambda kv: bytes(kv[0]))
    if args.car:
        args.car.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.car.parent, prefix=".car-")
        with open(fd, "wb") as f:
            w = CarWriter(f, [res.manifest_cid])
            for cid, data in blocks:
                w.write(cid, data)
        Path(tmp).replace(args.car)
    elif args.kubo:
        from cidboot.store.kubo import KuboClient

        kubo = KuboClient(args.kubo)
        for cid, data in blocks:
            kubo.put(cid, data)
        kubo.pin(res.manifest_cid)
        if res.uki:
            kubo.pin(res.uki.cid)
    else:
        # one batch, as a fetch writes: more than 16 new blocks land in one pack, in the order
        # the build made them (layer by layer, each file's leaves in order, which is how the
        # gateway reads them back); blocks the store holds already (a cached layer) are not
        # written again; durable (the batch's fsyncs) before the pin
        store = Blockstore(args.store)
        with store.writer(skip_present=True):
            for cid, data in res.blocks.items():
                store.put(cid, data)
        store.pin(res.manifest_cid)
        if res.uki:
            store.pin(res.uki.cid)


def _write_uki(res: BuildResult, dest: str) -> Path:
    """The UKI file, written whole or not at all (temp file + rename)."""
    assert res.uki is not None
    path = Path(dest) / res.uki.name if dest.endswith("/") or Path(dest).is_dir() else Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".uki-")
    with open(fd, "wb") as f:
        f.write(res.uki.data)
    Path(tmp).replace(path)
    return path


def _cap_layer_cache(cap: int | None, started: float, say: Callable[[str], None]) -> None:
    """Keep the layer cache under $CIDBOOT_LAYER_CACHE_MAX, never removing what this build used
    (its hits and new layers have an mtime after `started`, less the file system's coarse clock)."""
    if cap is None:
        return
    res = prune([kind_dir("layers")], max_bytes=cap, keep_since=started - 1.0)
    if res.entries:
        say(f"layer cache over {human_bytes(cap)} (CIDBOOT_LAYER_CACHE_MAX): removed the {res.entries} least "
            f"recently used entries ({human_bytes(res.bytes)}), kept {res.kept} ({human_bytes(res.kept_bytes)})")


def run(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.json
    started = time.time()
    cap = layer_cache_max()  # read before the build: a bad value is a usage error, not a lost build

    def say(msg: str) -> None:
        if not quiet:
            print(f"imagebuilder: {msg}", file=sys.stderr, flush=True)

    references: dict[str, bytes] = {}
    for spec in args.reference:
        name, value = parse_reference(spec)
        if name in references and references[name] != value:
            raise BuildError(f"--reference {name} given twice with different values")
        references[name] = value
    res = build(args.flow, progress=say, references=references, make_uki=args.uki is not None,
                flow_secret=args.flow_secret)
    _write(res, args)
    _cap_layer_cache(cap, started, say)
    unpinned = unpinned_layers(res.manifest)
    if unpinned:  # always, even with --quiet/--json: devices booting this image cannot be affirmed
        print(f"imagebuilder: WARNING: no reference value for {', '.join(unpinned)}: the manifest does not pin "
              f"the stage(s) below the image, so any {' or '.join(unpinned)} is accepted and appraisal of a device "
              f"booting {res.manifest_cid} is at best 'warning'. Pass "
              f"{' '.join(f'--reference {n}=HEX' for n in unpinned)} (the code hash from that stage's build).",
              file=sys.stderr, flush=True)
    uki_file = _write_uki(res, args.uki) if res.uki else None
    if args.json:
        out = res.to_json()
        if res.uki is not None:
            out["uki"] = {"name": res.uki.name, "cid": str(res.uki.cid), "size": res.uki.size,
                          "stub": str(res.uki.stub), "file": str(uki_file)}
        print_json(out)
        return 0
    if not args.quiet:
        for lyr in res.layers:
            enc = f"  encrypted, plaintext sha256:{lyr.plaintext.sha256.hex()[:16]}... {lyr.plaintext.size}" \
                if lyr.plaintext else ""
            print(f"{lyr.role:<11} {lyr.cid} {lyr.size:>10}{'  (cached)' if lyr.cached else ''}{enc}")
        if res.uki:
            print(f"{'uki':<11} {res.uki.cid} {res.uki.size:>10}  {uki_file}")
        if res.unresolved_imports:
            say(f"imports not in the image (built in to the interpreter or optional): "
                f"{', '.join(res.unresolved_imports)}")
    print(res.manifest_cid)
    return 0
