"""cidboot.netboot.dhcp_client + cidboot.netboot.netif against the real boot server in a network namespace, with
and without 20 % packet loss both ways (qemu/harness/netloss.py); plus the scapy-free request encoder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLIENT = r'''
import json, sys, time
from cidboot.netboot import dhcp_client, netif
t0 = time.monotonic()
ifname, mac = netif.bring_up()
t1 = time.monotonic()
log = []
for _ in range(int(sys.argv[1])):
    lease = dhcp_client.acquire(ifname, mac, user_class=b"cidboot-firmware", log=log.append)
t2 = time.monotonic()
netif.configure(ifname, lease.ip, lease.prefixlen, router=lease.router)
print(json.dumps({"ifname": ifname, "mac": mac, "ip": lease.ip, "prefixlen": lease.prefixlen, "server": lease.server_ip,
                  "next_server": lease.next_server, "boot_file": lease.boot_file, "up_s": t1 - t0, "dhcp_s": t2 - t1,
                  "retransmits": sum("retransmit" in m for m in log)}))
'''


@pytest.mark.netns
@pytest.mark.parametrize("loss", [0, 20])
def test_acquire_against_the_boot_server(tmp_path: Path, loss: int) -> None:
    from qemu.harness.netloss import add_loss
    from tests.support.boot_network import running_boot_server

    with running_boot_server(tmp_path, taps=0) as srv:
        host = srv.net.add_host()  # no address: like a NIC before DHCP
        if loss:
            add_loss(srv.net.host_cmd(host, []), "eth0", loss)  # client -> server
            add_loss(srv.net.cmd([]), "h0p", loss)  # server -> client
        t = time.monotonic()
        rounds = 12 if loss else 1  # enough exchanges that loss certainly hits some of them
        run = subprocess.run(srv.net.host_cmd(host, [sys.executable, "-c", CLIENT, str(rounds)]), capture_output=True, text=True,
                             timeout=180, cwd=Path(__file__).resolve().parents[2])
        wall = time.monotonic() - t
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        print(f"loss {loss}%: link up {out['up_s']:.2f} s, {rounds} DHCP leases {out['dhcp_s']:.2f} s, "
              f"{out['retransmits']} retransmissions, wall {wall:.2f} s")
        assert (out["retransmits"] > 0) == bool(loss)
        assert out["ifname"] == "eth0" and out["ip"].startswith("10.77.0.1") and out["prefixlen"] == 24
        assert out["server"] == "10.77.0.1" and out["next_server"] == "10.77.0.1"
        assert out["boot_file"] == "boot.ipxe"  # the firmware's user class gets the iPXE script
        if not loss:  # the configured address works: TFTP from the client namespace
            got = subprocess.run(srv.net.host_cmd(host, ["curl", "-sf", "tftp://10.77.0.1/boot.ipxe"]), capture_output=True,
                                 timeout=30)
            assert got.stdout.startswith(b"#!ipxe"), got


@pytest.mark.netns
def test_netif_configures_address_and_default_route(tmp_path: Path) -> None:
    from qemu.harness.netns import boot_network

    with boot_network(taps=0) as net:
        host = net.add_host()
        code = ("from cidboot.netboot import netif; n, mac = netif.bring_up(); "
                "netif.configure(n, '10.77.0.150', 24, router='10.77.0.1'); "
                "netif.configure(n, '10.77.0.150', 24, router='10.77.0.1'); print(n, mac)")  # twice: idempotent
        run = subprocess.run(net.host_cmd(host, [sys.executable, "-c", code]), capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).resolve().parents[2])
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("eth0 ")
        addr = subprocess.run(net.host_cmd(host, ["ip", "-4", "-o", "addr", "show", "eth0"]), capture_output=True, text=True)
        assert "10.77.0.150/24" in addr.stdout
        route = subprocess.run(net.host_cmd(host, ["ip", "route"]), capture_output=True, text=True)
        assert "default via 10.77.0.1 dev eth0" in route.stdout
