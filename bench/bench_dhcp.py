"""DHCP exchanges per second (DISCOVER/OFFER/REQUEST/ACK, one new MAC each): our server vs
dnsmasq run by hand, with the same load client.

Both servers run in a network namespace this bench creates, one after the other on the same
bridge; the load client runs in a second namespace. It builds its packets with scapy before
the clock starts (cidboot.netboot.dhcp.build_request; the REQUEST's address is patched in), keeps
--inflight exchanges going at once, resends a DISCOVER after 1 s without an answer, and
counts an exchange as done at its ACK (a NAK restarts it at DISCOVER, as a real client would). Our server runs with its per-MAC and new-lease rate
limits lifted (by default it allows 50 new leases/s, on purpose), once with its lease file
(like dnsmasq's) and once in memory.
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
import time
from pathlib import Path

from bench.common import parse_args, write_results
from qemu.harness.netns import boot_network

FIRST, LAST = "10.77.1.0", "10.77.16.255"
PLACEHOLDER = "1.2.3.4"


def client_main(n: int, inflight: int, server_ip: str) -> int:
    """Child mode (inside the client namespace): run the load, print a JSON summary."""
    from cidboot.netboot import dhcp

    # scattered (but fixed) MACs like a real fleet's: sequential ones make dnsmasq's hashed
    # address choice collide among clients in flight
    macs = ["02:" + hashlib.sha256(i.to_bytes(4, "big")).digest()[:5].hex(":") for i in range(n)]
    discover = [dhcp.build_request(m, dhcp.DISCOVER, xid=i + 1) for i, m in enumerate(macs)]
    request = [dhcp.build_request(m, dhcp.REQUEST, xid=i + 1, requested_ip=PLACEHOLDER, server_id=server_ip)
               for i, m in enumerate(macs)]
    needle = b"\x32\x04" + socket.inet_aton(PLACEHOLDER)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    s.bind(("0.0.0.0", 68))
    dst = ("255.255.255.255", 67)
    state: dict[int, tuple[str, float]] = {}  # xid -> (phase, sent at)
    nxt, done, retries, malformed, naks = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    deadline = t0 + 120
    while done < n and time.perf_counter() < deadline:
        while len(state) < inflight and nxt < n:
            s.sendto(discover[nxt], dst)
            state[nxt + 1] = ("discover", time.perf_counter())
            nxt += 1
        r, _, _ = select.select([s], [], [], 0.05)
        while r:
            try:
                data = s.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            try:
                rep = dhcp.parse(data)
            except Exception:
                malformed += 1
                continue
            if rep.op != 2 or rep.xid not in state:
                continue
            phase = state[rep.xid][0]
            if rep.msg_type == dhcp.OFFER and phase == "discover":
                s.sendto(request[rep.xid - 1].replace(needle, b"\x32\x04" + socket.inet_aton(rep.yiaddr)), dst)
                state[rep.xid] = ("request", time.perf_counter())
            elif rep.msg_type == dhcp.ACK and phase == "request":
                del state[rep.xid]
                done += 1
            elif rep.msg_type == dhcp.NAK and phase == "request":
                s.sendto(discover[rep.xid - 1], dst)  # as a real client does: start over
                state[rep.xid] = ("discover", time.perf_counter())
                naks += 1
        now = time.perf_counter()
        for xid, (_phase, at) in list(state.items()):
            if now - at > 1.0:
                s.sendto(discover[xid - 1], dst)
                state[xid] = ("discover", now)
                retries += 1
    elapsed = time.perf_counter() - t0
    print(json.dumps({"done": done, "failed": n - done, "seconds": elapsed, "retries": retries, "naks": naks,
                      "malformed": malformed}))
    return 0


OURS = """
import sys
from pathlib import Path
from bootstrap.server.dhcp_server import DhcpConfig, DhcpServer
from bootstrap.server.leases import LeaseDB
from bootstrap.server.metrics import Metrics
path = Path(sys.argv[1]) if sys.argv[1] != "-" else None
leases = LeaseDB({first!r}, {last!r}, path=path, new_per_second=1e9, per_mac_per_second=1e9)
DhcpServer(DhcpConfig("br0", {ip!r}, netmask="255.255.0.0", leases=leases), Metrics()).serve_forever()
"""


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    args = parse_args(__doc__ or "", [
        ("--clients", {"type": int, "default": 2000}), ("--inflight", {"type": int, "default": 64}),
        ("--baseline", {"metavar": "DIR", "help": "also run the server of another checkout (e.g. main) with its lease "
                                                  "file in the same run: before/after figures"})])
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d, boot_network(prefixlen=16, taps=0) as net:
        work = Path(d)
        ip = net.server_ip
        host = net.add_host("10.77.0.50")
        servers = {
            "ours (lease file)": [sys.executable, "-c", OURS.format(first=FIRST, last=LAST, ip=ip), str(work / "leases.json")],
            "ours (in memory)": [sys.executable, "-c", OURS.format(first=FIRST, last=LAST, ip=ip), "-"],
            "dnsmasq": ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--interface=br0",
                        "--bind-interfaces", f"--dhcp-range={FIRST},{LAST},255.255.0.0,1h", "--dhcp-lease-max=100000",
                        f"--dhcp-leasefile={work / 'dnsmasq.leases'}", "--no-ping", "--dhcp-authoritative",
                        f"--pid-file={work / 'dnsmasq.pid'}", "--user=root", "--log-facility=/dev/null"],
        }
        if args.baseline:
            servers["baseline (lease file)"] = servers["ours (lease file)"]
        for label, argv in servers.items():
            for f in ("leases.json", "dnsmasq.leases"):
                (work / f).unlink(missing_ok=True)
            proc = net.popen(argv, cwd=os.path.abspath(args.baseline) if label.startswith("baseline") else os.getcwd())
            try:
                time.sleep(1.5)
                if proc.poll() is not None:
                    raise SystemExit(f"{label} did not start")
                out = subprocess.run(net.host_cmd(host, [sys.executable, "-m", "bench.bench_dhcp", "--client", str(args.clients),
                                                         str(args.inflight), ip]),
                                     capture_output=True, text=True, timeout=300, cwd=os.getcwd())
                if out.returncode:
                    raise SystemExit(f"{label}: load client failed: {out.stderr[-800:]}")
                results[label] = json.loads(out.stdout)
                print(label, results[label], file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(10)
    ref = results["dnsmasq"]
    ref_rate = ref["done"] / ref["seconds"]
    rows = []
    for label, r in results.items():
        rate = r["done"] / r["seconds"]
        rows.append({"server": label, "exchanges": int(r["done"]), "failed": int(r["failed"]), "retries": int(r["retries"]), "naks": int(r["naks"]),
                     "seconds": r["seconds"], "exchanges_s": rate, "vs_dnsmasq": rate / ref_rate})
    write_results(args.out, "bench_dhcp", rows, {
        "clients": args.clients, "inflight": args.inflight, "baseline": args.baseline,
        "reference": "dnsmasq --no-ping --dhcp-authoritative with a lease file, same namespace and load client",
        "note": "our rate limits lifted for this run; the default of 50 new leases/s would cap it"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
