"""The boot server against real clients inside a network namespace the test creates:
QEMU's iPXE ROM (a real PXE client), busybox udhcpc, curl and tftp-hpa; and hostile input."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.boot_network import running_boot_server

pytestmark = pytest.mark.netns
MAC = "52:54:00:12:34:56"


def test_qemu_ipxe_gets_a_lease_and_boots_our_script_over_tftp(tmp_path: Path) -> None:
    with running_boot_server(tmp_path) as srv:
        console = tmp_path / "console.log"
        with open(console, "w") as out:
            qemu = srv.net.popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
                                  "-boot", "n", "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                                  "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"], stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and "cidboot: booting the bootstrap" not in console.read_text(errors="replace"):
                    time.sleep(0.5)
            finally:
                qemu.kill()
                qemu.wait()
        text = console.read_text(errors="replace")
        assert f"cidboot: booting the bootstrap for {MAC}" in text, text[-2000:]
        events = srv.events()
        leases = [e for e in events if str(e.get("msg", "")).startswith("lease ") and e.get("mac") == MAC]
        assert leases and re.match(r"10\.77\.0\.1\d\d", str(leases[0]["ip"]))
        assert any(e.get("file") == "boot.ipxe" and str(e.get("msg", "")).startswith("TFTP sent") for e in events)
        m = srv.metrics()
        assert m["cidboot_tftp_transfers_total"] >= 1 and m['cidboot_dhcp_requests_total{type="REQUEST"}'] >= 1


def test_udhcpc_and_tftp_clients(tmp_path: Path) -> None:
    with running_boot_server(tmp_path, taps=0) as srv:
        srv.net.add_veth_host("cl0", "")
        out = srv.net.run(["busybox", "udhcpc", "-i", "cl0", "-V", "PXEClient:Arch:00000:UNDI:002001", "-n", "-q",
                           "-t", "5", "-T", "1", "-s", "/bin/true", "-O", "bootfile"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert re.search(r"lease of 10\.77\.0\.1\d\d obtained", out.stdout + out.stderr)
        srv.net.add_veth_host("cl1", "10.77.0.200")
        got = tmp_path / "got"
        curl = srv.net.run(["curl", "-sf", "--tftp-blksize", "1468", "-o", str(got), "tftp://10.77.0.1/bootstrap/big.bin"], timeout=60)
        assert curl.returncode == 0 and got.read_bytes() == (srv.tftp_root / "bootstrap" / "big.bin").read_bytes()
        hpa = srv.net.run(["tftp", "10.77.0.1", "-m", "binary", "-c", "get", "boot.ipxe", str(tmp_path / "s")], capture_output=True, timeout=60)
        assert hpa.returncode == 0 and (tmp_path / "s").read_text().startswith("#!ipxe")
        cfg = srv.net.run(["curl", "-sf", "tftp://10.77.0.1/bootconfig/52-54-00-00-00-01.json"], capture_output=True, timeout=30)
        assert b'"gateways":["http://10.77.0.1:8080"]' in cfg.stdout


HOSTILE = r'''
import socket, struct, sys
from cidboot.netboot import dhcp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
dst = ("255.255.255.255", 67)
good = dhcp.build_request("52:54:00:aa:bb:01", dhcp.DISCOVER, xid=1)
base = good[:240]
bad = [
    good[:100],                                            # truncated header
    base + b"\x35\x01\x01\x5d\x03\x00\x00\x00\xff",        # option 93 odd length
    base + b"\x35\x02\x01\x01\xff",                        # option 53 wrong length
    base + b"\x35\x01\x01\x3c\x50abc",                     # option length past the end
    base + b"\x35\x01\x01" + b"\x0c\x01x" * 200 + b"\xff", # huge option set
    base + b"\x35\x01\x01",                                # no end option
    good[:236] + b"XXXX" + good[240:],                     # no magic cookie
]
for p in bad:
    s.sendto(p, dst)
for i in range(300):                                       # starvation: many MACs
    s.sendto(dhcp.build_request("02:00:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255), dhcp.DISCOVER, xid=i), dst)
print("sent", len(bad), 300)
'''


def test_hostile_dhcp_input_then_good_client_still_served(tmp_path: Path) -> None:
    with running_boot_server(tmp_path, taps=0) as srv:
        host = srv.net.add_host("10.77.0.201")
        sent = subprocess.run(srv.net.host_cmd(host, [sys.executable, "-c", HOSTILE]), capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        time.sleep(1.5)
        m = srv.metrics()
        assert m['cidboot_dhcp_errors_total{reason="malformed"}'] == 7
        # the pool (20 addresses) bounds what the flood could take, and the server still answers
        assert m.get('cidboot_dhcp_errors_total{reason="pool_exhausted"}', 0) + m.get('cidboot_dhcp_errors_total{reason="rate_limited"}', 0) > 0
        reasons = {str(e.get("error")) for e in srv.events() if e.get("error")}
        for why in ("option 93", "option 53 must be 1 bytes", "runs past the end", "more than 96 options",
                    "not terminated", "magic cookie", "truncated"):
            assert any(why in r for r in reasons), (why, reasons)
        # flood over: wait for rate limits to refill, then a real client still gets served (a lease it was
        # offered earlier or a free one: exhaustion is reported, the server stays up)
        time.sleep(1.0)
        client = srv.net.add_host()
        out = subprocess.run(srv.net.host_cmd(client, ["busybox", "udhcpc", "-i", "eth0", "-V", "PXEClient", "-n", "-q",
                                                       "-t", "8", "-T", "1", "-s", "/bin/true"]), capture_output=True, text=True, timeout=60)
        assert "obtained" in out.stdout + out.stderr or m.get('cidboot_dhcp_errors_total{reason="pool_exhausted"}', 0) > 0
        tftp = subprocess.run(srv.net.host_cmd(host, ["curl", "-sf", "-o", "/dev/null", "tftp://10.77.0.1/boot.ipxe"]), timeout=30)
        assert tftp.returncode == 0
        assert srv.proc.poll() is None


def test_tftp_refusals_over_the_wire(tmp_path: Path) -> None:
    with running_boot_server(tmp_path, taps=0) as srv:
        (srv.tftp_root / "escape").symlink_to("/etc/hostname")
        for path in ("../../etc/passwd", "escape", "nope"):
            r = srv.net.run(["curl", "-s", "--path-as-is", "-o", "/dev/null", f"tftp://10.77.0.1/{path}"], timeout=30)
            assert r.returncode != 0, path
        put = srv.net.run(["curl", "-s", "-T", "/etc/hostname", "tftp://10.77.0.1/upload"], timeout=30)
        assert put.returncode != 0
        m = srv.metrics()
        assert m['cidboot_tftp_errors_total{code="2"}'] >= 3 and m['cidboot_tftp_errors_total{code="1"}'] >= 1
        ok = srv.net.run(["curl", "-sf", "-o", "/dev/null", "tftp://10.77.0.1/boot.ipxe"], timeout=30)
        assert ok.returncode == 0


PROXY_CLIENT = r'''
import json, socket
from cidboot.netboot import dhcp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
s.settimeout(3)
def ask(pkt, dst):
    s.sendto(pkt, dst)
    try:
        rep = dhcp.parse(s.recv(4096))
    except TimeoutError:
        return None
    return {"type": rep.msg_name, "yiaddr": rep.yiaddr, "siaddr": rep.siaddr, "file": rep.file.decode(),
            "vendor": rep.vendor_class}
mac = "52:54:00:00:40:11"
out = {
    "plain": ask(dhcp.build_request("52:54:00:00:00:99", dhcp.DISCOVER, xid=7, vendor_class=b"udhcp 1.36", arch=None),
                 ("255.255.255.255", 67)),
    "offer": ask(dhcp.build_request(mac, dhcp.DISCOVER, xid=8, arch=dhcp.ARCH_X86_64_UEFI), ("255.255.255.255", 67)),
    "ack4011": ask(dhcp.build_request(mac, dhcp.REQUEST, xid=9, arch=dhcp.ARCH_X86_BIOS), ("10.77.0.1", 4011)),
}
print(json.dumps(out))
'''


def test_proxy_dhcp_answers_pxe_clients_only_with_boot_info_and_on_port_4011(tmp_path: Path) -> None:
    import json

    with running_boot_server(tmp_path, taps=0, extra=["--proxy-dhcp"]) as srv:
        host = srv.net.add_host("10.77.0.150")  # the site's DHCP server gave it this address
        run = subprocess.run(srv.net.host_cmd(host, [sys.executable, "-c", PROXY_CLIENT]), capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["plain"] is None  # not a PXE client: left to the site's DHCP server
        assert out["offer"] == {"type": "OFFER", "yiaddr": "0.0.0.0", "siaddr": "10.77.0.1", "file": "bootstrap-x86_64.efi",
                                "vendor": "PXEClient"}
        assert out["ack4011"] == {"type": "ACK", "yiaddr": "0.0.0.0", "siaddr": "10.77.0.1", "file": "undionly.kpxe",
                                  "vendor": "PXEClient"}
        assert srv.metrics().get("cidboot_dhcp_leases_active") is None  # no pool in proxy mode
