"""200 simulated PXE clients booting at once from `bootstrap serve`: each does DISCOVER/OFFER/
REQUEST/ACK with its own MAC, then downloads over TFTP the boot file named in its ACK (a
--size-mib "bootstrap"), from the address it was leased. Reports failures (must be zero),
the total time and per-client times, beside one client booting alone in the same run.

The server is the real CLI process with its default limits (50 new leases/s, 5 packets/s per
MAC): clients that are not answered resend their DISCOVER after 1 s, as PXE ROMs do (theirs
back off from 4 s). Everything runs in network namespaces this bench creates.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import parse_args, write_results

MIB = 1024 * 1024
BOOT_FILE = "undionly.kpxe"  # what the server names for x86 BIOS PXE clients


def _client(i: int, server_ip: str, want: str, windowsize: int, addr_lock: threading.Lock,
            results: list[dict[str, object]]) -> None:
    from pyroute2 import IPRoute

    from bench.tftp_client import get
    from cidboot.netboot import dhcp

    t0 = time.perf_counter()
    mac = f"02:50:58:00:{i >> 8 & 255:02x}:{i & 255:02x}"
    xid = 0x50580000 + i
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    s.bind(("0.0.0.0", 68))
    dst = ("255.255.255.255", 67)
    res: dict[str, object] = {"client": i, "ok": False, "discovers": 0}
    try:
        ip, boot = "", ""
        deadline = time.perf_counter() + 60
        pkt, phase = dhcp.build_request(mac, dhcp.DISCOVER, xid=xid), "discover"
        sent_at = 0.0
        while time.perf_counter() < deadline and not boot:
            if time.perf_counter() - sent_at > 1.0:
                if phase == "request":  # no ACK: start over
                    pkt, phase = dhcp.build_request(mac, dhcp.DISCOVER, xid=xid), "discover"
                s.sendto(pkt, dst)
                res["discovers"] = int(res["discovers"]) + (phase == "discover")  # type: ignore[call-overload]
                sent_at = time.perf_counter()
            r, _, _ = select.select([s], [], [], 0.2)
            if not r:
                continue
            rep = dhcp.parse(s.recv(4096))
            if rep.op != 2 or rep.xid != xid:
                continue
            if rep.msg_type == dhcp.OFFER and phase == "discover":
                ip = rep.yiaddr
                pkt, phase = dhcp.build_request(mac, dhcp.REQUEST, xid=xid, requested_ip=ip, server_id=server_ip), "request"
                s.sendto(pkt, dst)
                sent_at = time.perf_counter()
            elif rep.msg_type == dhcp.ACK and phase == "request":
                boot = rep.file.decode()
            elif rep.msg_type == dhcp.NAK:
                pkt, phase, sent_at = dhcp.build_request(mac, dhcp.DISCOVER, xid=xid), "discover", 0.0
        if not boot:
            res["error"] = "no lease"
            return
        res["dhcp_s"] = time.perf_counter() - t0
        with addr_lock, IPRoute() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=ip, prefixlen=24)
        data = get(server_ip, 69, boot, blksize=1468, windowsize=windowsize, timeout=2.0, retries=8, bind=ip)
        if hashlib.sha256(data).hexdigest() != want:
            res["error"] = "wrong bytes"
            return
        res.update(ok=True, ip=ip, file=boot, total_s=time.perf_counter() - t0)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        s.close()
        results.append(res)


def client_main(n: int, server_ip: str, want: str, windowsize: int, first: int) -> int:
    """Child mode (inside the client namespace): n clients at once; prints a JSON summary."""
    results: list[dict[str, object]] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_client, args=(first + i, server_ip, want, windowsize, lock, results)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"seconds": time.perf_counter() - t0, "clients": results}))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        a = sys.argv[2:]
        return client_main(int(a[0]), a[1], a[2], int(a[3]), int(a[4]))
    args = parse_args(__doc__ or "", [("--clients", {"type": int, "default": 200}), ("--size-mib", {"type": int, "default": 4}),
                                      ("--windowsize", {"type": int, "default": 8})])
    from tests.support.boot_network import running_boot_server

    blob = os.urandom(args.size_mib * MIB)
    want = hashlib.sha256(blob).hexdigest()
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        with running_boot_server(Path(d), taps=0, extra=["--dhcp-range", "10.77.0.10-10.77.0.250"]) as srv:
            (srv.tftp_root / BOOT_FILE).write_bytes(blob)
            host = srv.net.add_host("10.77.0.5")
            for label, n, first in (("1 client alone", 1, 1000), (f"{args.clients} clients at once", args.clients, 0)):
                out = subprocess.run(srv.net.host_cmd(host, [sys.executable, "-m", "bench.bench_pxe200", "--client", str(n),
                                                             srv.net.server_ip, want, str(args.windowsize), str(first)]),
                                     capture_output=True, text=True, timeout=900, cwd=os.getcwd())
                if out.returncode:
                    raise SystemExit(f"{label}: client failed: {out.stderr[-800:]}")
                runs[label] = json.loads(out.stdout)
            metrics = srv.metrics()
    rows = []
    alone = float(runs["1 client alone"]["seconds"])
    for label, r in runs.items():
        cl = r["clients"]
        ok = [c for c in cl if c["ok"]]
        totals = sorted(float(c["total_s"]) for c in ok)
        dhcps = sorted(float(c["dhcp_s"]) for c in ok)
        rows.append({"run": label, "clients": len(cl), "failures": len(cl) - len(ok), "total_s": float(r["seconds"]),
                     "dhcp_median_s": dhcps[len(dhcps) // 2] if dhcps else None,
                     "boot_median_s": totals[len(totals) // 2] if totals else None, "boot_max_s": totals[-1] if totals else None,
                     "extra_discovers": sum(int(c["discovers"]) - 1 for c in cl),
                     "MiB_s_total": len(ok) * args.size_mib / float(r["seconds"]), "total_vs_alone": float(r["seconds"]) / alone})
        errors = sorted({str(c.get("error")) for c in cl if not c["ok"]})
        if errors:
            print(f"{label}: errors {errors[:5]}", file=sys.stderr)
    write_results(args.out, "bench_pxe200", rows, {
        "size_mib": args.size_mib, "blksize": 1468, "windowsize": args.windowsize,
        "server_metrics": {k: v for k, v in metrics.items() if "dhcp" in k or "tftp" in k},
        "reference": "one client booting alone from the same server in the same run"})
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
