"""`bootstrap serve --upstream` as a process, in a network namespace the test creates: a boot
server with an empty store serves a manifest DAG it pulls from an upstream gateway
(`bootstrap gateway` over another store), verified, and counts what it pulled on /metrics; boot
configs list the server first and the fall-back gateway after; a CID no upstream has is a 502."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cidboot.ipld import dag
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from tests.support.boot_network import running_boot_server
from tests.unit.test_cluster import make_signed_manifest

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
UPSTREAM = "http://10.77.0.1:8090"


def test_serve_with_an_empty_store_pulls_from_its_upstream(tmp_path: Path) -> None:
    up = Blockstore(tmp_path / "upstream")
    manifest, _ = make_signed_manifest(up, seed=31)
    blocks = dict(dag.walk(manifest, up.get))
    extra = ["--dhcp-range", "10.77.0.100-10.77.0.119", "--upstream", UPSTREAM, "--cache-size", "64M",
             "--gateway", "self", "--gateway", UPSTREAM]
    with running_boot_server(tmp_path, taps=0, extra=extra) as srv:
        gw = srv.net.popen([sys.executable, "-m", "bootstrap", "gateway", "--store", str(up.path), "--listen",
                            "10.77.0.1:8090"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while srv.net.run(["curl", "-s", "-o", "/dev/null", f"{UPSTREAM}/ipfs/{manifest}?format=raw"],
                              timeout=10).returncode != 0:
                assert time.monotonic() < deadline, "upstream gateway did not start"
                time.sleep(0.2)
            car = tmp_path / "got.car"
            got = srv.net.run(["curl", "-sf", "-o", str(car), f"http://10.77.0.1:8080/ipfs/{manifest}?format=car"],
                              timeout=120)
            assert got.returncode == 0
            with open(car, "rb") as f:
                served = dict(CarReader(f))  # every section hashed against its CID
            assert served == blocks
            m = srv.metrics()
            assert m["cidboot_upstream_bytes_total"] == sum(len(b) for b in blocks.values())
            assert m["cidboot_upstream_blocks_total"] == len(blocks) and m["cidboot_upstream_rejected_total"] == 0
            absent = CID.of(b"no upstream has this", RAW)
            code = srv.net.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://10.77.0.1:8080/ipfs/{absent}?format=raw"], capture_output=True, text=True,
                               timeout=60)
            assert code.stdout == "502"
            cfg = srv.net.run(["curl", "-sf", "tftp://10.77.0.1/bootconfig/52-54-00-00-00-01.json"],
                              capture_output=True, timeout=30)
            assert b'"gateways":["http://10.77.0.1:8080","http://10.77.0.1:8090"]' in cfg.stdout
            again = srv.net.run(["curl", "-sf", "-o", "/dev/null", f"http://10.77.0.1:8080/ipfs/{manifest}?format=car"],
                                timeout=120)
            assert again.returncode == 0 and srv.metrics()["cidboot_upstream_blocks_total"] == len(blocks)  # cached
        finally:
            gw.terminate()
            gw.wait(10)
