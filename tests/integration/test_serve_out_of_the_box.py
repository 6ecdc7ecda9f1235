"""`bootstrap serve` out of the box (issue 14): started with nothing but --interface --dhcp-range
--store --manifest, it builds the bootstrap for the manifest's root (bootstrap.bootfiles) and
offers every client architecture its boot file: a scapy DISCOVER per RFC 4578 arch gets an
offer whose file then downloads (TFTP or HTTP) byte-identical to what imagebuilder built (the
x86_64 UKI for 7, 9 and 16, the arm64 UKI for 11 and 19); an unknown arch gets no offer and a log line. A client on another subnet gets
a lease from that subnet's range through a real DHCP relay (dnsmasq --dhcp-relay) in a second
namespace, with the relay as its router, and fetches the boot file it was offered (TFTP and
HTTP, byte-identical) across the relay's routing. Unknown files: TFTP error / HTTP 404, and the server keeps serving."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bootstrap import bootfiles
from cidboot.ipld.unixfs.importer import ImportOptions, import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from qemu.harness.netns import boot_network
from tests.support.boot_network import running_boot_server

pytestmark = [pytest.mark.netns, pytest.mark.build]
REPO = Path(__file__).resolve().parents[2]

SCAPY_CLIENT = r'''
import json, sys, time
from scapy.all import AsyncSniffer, Ether, IP, UDP, Raw, sendp, conf
from cidboot.netboot import dhcp
conf.verb = 0
out = {}
for i, arch in enumerate([0, 7, 9, 11, 16, 19, 0x1234]):
    mac = f"52:54:00:aa:00:{i:02x}"
    vendor = f"{'HTTPClient' if arch in (16, 19) else 'PXEClient'}:Arch:{arch:05d}:UNDI:003001".encode()
    raw = dhcp.encode_request(mac, dhcp.DISCOVER, xid=0x1000 + i, arch=arch, vendor_class=vendor)
    sn = AsyncSniffer(iface="eth0", store=True, lfilter=lambda p: UDP in p and p[UDP].dport == 68)
    sn.start(); time.sleep(0.3)
    sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
          / Raw(raw), iface="eth0")
    time.sleep(2.0)
    got = None
    for p in sn.stop():
        rep = dhcp.parse(bytes(p[UDP].payload))
        if rep.xid == 0x1000 + i:
            got = {"type": rep.msg_name, "file": rep.file.decode(), "vendor": rep.vendor_class, "yiaddr": rep.yiaddr}
    out[str(arch)] = got
print(json.dumps(out))
'''


def _signed_manifest(store: Blockstore) -> tuple[str, RootOfTrust]:
    k = keys.generate()
    root = RootOfTrust.from_public_keys([k.public_key()], 1)
    layers = tuple(Layer(import_bytes(data, store, ImportOptions(cid_version=1)).cid, len(data), role)
                   for role, data in (("kernel", b"k" * 100), ("runtime", b"r" * 100)))
    signed = sign_manifest(Manifest("hello", 1, int(time.time()) + 3600, layers, root, cmdline="console=ttyS0"), [k])
    store.put(signed.cid, signed.encode())
    return str(signed.cid), root


def test_serve_with_only_a_manifest_offers_every_arch_a_byte_identical_boot_file(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    mcid, _root = _signed_manifest(store)
    cache = tmp_path / "bootfiles"
    env = {**os.environ, "CIDBOOT_BOOTFILES_CACHE": str(cache)}
    with boot_network(taps=0) as net:
        log = tmp_path / "server.log"
        with open(log, "w") as logf:
            t0 = time.monotonic()
            proc = net.popen([sys.executable, "-m", "bootstrap", "--log-json", "-v", "serve", "--interface", "br0",
                              "--dhcp-range", "10.77.0.100-10.77.0.149", "--store", str(store.path), "--manifest", mcid],
                             stdout=subprocess.PIPE, stderr=logf, text=True, env=env, cwd=REPO)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "serving on br0" in line, log.read_text()[-3000:]
            print(f"\nserver up (bootstrap built for the manifest's root) in {time.monotonic() - t0:.1f} s")
            entries = {json.loads((d / "built.json").read_text()).get("arch", "x86_64"): d
                       for d in cache.iterdir() if not d.name.startswith(".")}
            assert sorted(entries) == ["arm64", "x86_64"]
            entry = entries["x86_64"]
            built = json.loads((entry / "built.json").read_text())
            uki = (entry / built["uki"]["x86_64"]).read_bytes()
            assert built["result"]["uki"]["size"] == len(uki)
            uki_arm64 = (entries["arm64"] / "uki" / "bootstrap-arm64.efi").read_bytes()
            assert uki_arm64[:2] == b"MZ" and uki_arm64 != uki
            client = net.add_host()
            run = subprocess.run(net.host_cmd(client, [sys.executable, "-c", SCAPY_CLIENT]), capture_output=True,
                                 text=True, timeout=180, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert run.returncode == 0, run.stderr[-3000:]
            offers = json.loads(run.stdout)
            http = "http://10.77.0.1:8080/boot/bootstrap-x86_64.efi"
            assert offers["0"]["file"] == "undionly.kpxe"
            assert offers["7"]["file"] == offers["9"]["file"] == "bootstrap-x86_64.efi"
            assert offers["16"]["file"] == http and offers["16"]["vendor"] == "HTTPClient"
            http_arm64 = "http://10.77.0.1:8080/boot/bootstrap-arm64.efi"
            assert offers["11"]["file"] == "bootstrap-arm64.efi"
            assert offers["19"]["file"] == http_arm64 and offers["19"]["vendor"] == "HTTPClient"
            assert all(offers[a]["type"] == "OFFER" and offers[a]["yiaddr"].startswith("10.77.0.1")
                       for a in ("0", "7", "9", "11", "16", "19"))
            assert offers[str(0x1234)] is None
            text = log.read_text()
            assert "client architecture 0x1234" in text
            # the files, downloaded by a host with an address, are what imagebuilder built
            other = net.add_host("10.77.0.210")

            def get(url: str) -> subprocess.CompletedProcess[bytes]:
                return subprocess.run(net.host_cmd(other, ["curl", "-s", "-f", "--max-time", "120", "-o", "-", url]),
                                      capture_output=True, timeout=180)

            assert get("tftp://10.77.0.1/undionly.kpxe").stdout == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
            assert get("tftp://10.77.0.1/bootstrap-x86_64.efi").stdout == uki
            assert get(http).stdout == uki
            assert get(http_arm64).stdout == uki_arm64
            assert get("tftp://10.77.0.1/bootstrap/vmlinuz").stdout == (entry / built["kernel"]).read_bytes()
            # BIOS: boot.ipxe gives the bootstrap kernel its manifest's parameters (the same-kernel rule)
            kernel_line = next(ln for ln in get("tftp://10.77.0.1/boot.ipxe").stdout.decode().splitlines()
                               if ln.startswith("kernel "))
            assert built["result"]["cmdline"] and kernel_line.endswith(" " + built["result"]["cmdline"]), kernel_line
            # bad input: precise errors, and the server keeps serving
            assert get("tftp://10.77.0.1/no-such-file.efi").returncode != 0
            missing = subprocess.run(net.host_cmd(other, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                                          "http://10.77.0.1:8080/boot/no-such-file.efi"]),
                                     capture_output=True, text=True, timeout=60)
            assert missing.stdout == "404"
            assert get("tftp://10.77.0.1/undionly.kpxe").returncode == 0
            assert get(http).stdout == uki
        finally:
            proc.terminate()
            proc.wait(15)


def test_serve_without_a_boot_file_exits_naming_it_and_its_package(tmp_path: Path) -> None:
    store = Blockstore(tmp_path / "store")
    manifest = store.put_block(b"not a manifest", 0x55)
    with boot_network(taps=0) as net:
        run = net.run([sys.executable, "-m", "bootstrap", "serve", "--interface", "br0", "--dhcp-range",
                       "10.77.0.100-10.77.0.149", "--store", str(store.path), "--manifest", str(manifest)],
                      capture_output=True, text=True, timeout=120, cwd=REPO,
                      env={**os.environ, "CIDBOOT_BOOTFILES_CACHE": str(tmp_path / "c")})
    assert run.returncode == 1
    assert "cannot build the bootstrap" in run.stderr and str(manifest) in run.stderr


@contextmanager
def _relayed_client(srv_ns: str, host_ns: str) -> Iterator[str]:
    """A client namespace behind `host_ns` (the relay): host_ns eth1 10.88.0.1/24 <-> client eth0."""
    client = f"{host_ns}-c"
    sh = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    sh("ip", "netns", "add", client)
    try:
        sh("ip", "-n", host_ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", client)
        sh("ip", "-n", host_ns, "addr", "add", "10.88.0.1/24", "dev", "eth1")
        sh("ip", "-n", host_ns, "link", "set", "eth1", "up")
        sh("ip", "-n", client, "link", "set", "eth0", "up")
        sh("ip", "-n", client, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", host_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", srv_ns, "route", "add", "10.88.0.0/24", "via", "10.77.0.2")
        yield client
    finally:
        subprocess.run(["ip", "netns", "del", client], capture_output=True)


#: udhcpc's script: on a lease, configure it as the server said (address, netmask, router: the
#: relay) and keep what the offer carried, so the client can then fetch its boot file
UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr flush dev "$interface"
ip addr add "$ip/$mask" dev "$interface"
ip route replace default via "$router"
printf '{"ip": "%s", "router": "%s", "siaddr": "%s", "boot_file": "%s"}\\n' "$ip" "$router" "$siaddr" "$boot_file" >> "$LEASE_OUT"
"""


def test_client_behind_a_dhcp_relay_gets_a_lease_from_its_subnets_range_and_its_boot_file(tmp_path: Path) -> None:
    """Through dnsmasq --dhcp-relay, a UEFI PXE client (arch 7) and a UEFI HTTP Boot client (arch 16) on
    10.88.0.0/24 get leases from that subnet's range with the relay as router, then fetch the boot
    file each was offered (TFTP from siaddr, the http:// URL) through the relay's routing:
    byte-identical to the server's. The boot file is multi-block (TFTP windows, HTTP body) on purpose."""
    boot_file = os.urandom(300_000)  # ~600 TFTP blocks
    (tmp_path / "tftp").mkdir()
    (tmp_path / "tftp" / "bootstrap-x86_64.efi").write_bytes(boot_file)
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    leases = tmp_path / "leases.jsonl"
    extra = ["--dhcp-range", "10.77.0.100-10.77.0.119", "--dhcp-range", "10.88.0.100-10.88.0.119/24"]
    with running_boot_server(tmp_path, taps=0, extra=extra) as srv:
        relay_ns = srv.net.add_host("10.77.0.2")
        with _relayed_client(srv.net.name, relay_ns) as client:
            relay = subprocess.Popen(srv.net.host_cmd(relay_ns, [
                "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--log-dhcp",
                "--dhcp-relay=10.88.0.1,10.77.0.1", "--interface=eth1", "--bind-dynamic",
                f"--pid-file={tmp_path / 'relay.pid'}"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def in_client(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
                return subprocess.run(["ip", "netns", "exec", client, *cmd], capture_output=True, timeout=120,
                                      env={**os.environ, "LEASE_OUT": str(leases)}, **kw)  # type: ignore[call-overload]

            try:
                time.sleep(1.0)
                outs = []
                for arch, vendor in ((7, "PXEClient:Arch:00007:UNDI:003016"), (16, "HTTPClient:Arch:00016:UNDI:003016")):
                    outs.append(in_client(["busybox", "udhcpc", "-i", "eth0", "-V", vendor, "-x", f"0x5d:{arch:04x}",
                                           "-n", "-q", "-t", "6", "-T", "2", "-s", str(script)]))
            finally:
                relay.terminate()
                relay_out = relay.communicate(timeout=10)[0]
            text = "".join((o.stdout + o.stderr).decode() for o in outs)
            assert all(o.returncode == 0 for o in outs), text + relay_out[-2000:]
            assert len(re.findall(r"lease of 10\.88\.0\.1\d\d obtained", text)) == 2, text
            pxe, http = (json.loads(ln) for ln in leases.read_text().splitlines())
            assert pxe["router"] == http["router"] == "10.88.0.1" and pxe["ip"].startswith("10.88.0.1"), (pxe, http)
            assert pxe["siaddr"] == "10.77.0.1" and pxe["boot_file"] == "bootstrap-x86_64.efi", pxe
            assert http["boot_file"] == "http://10.77.0.1:8080/boot/bootstrap-x86_64.efi", http
            # the boot files, fetched as the firmware would, across the relay's routing
            tftp = in_client(["curl", "-s", "-f", "--max-time", "120", "-o", "-",
                              f"tftp://{pxe['siaddr']}/{pxe['boot_file']}"])
            assert tftp.returncode == 0 and tftp.stdout == boot_file, (tftp.returncode, len(tftp.stdout))
            got = in_client(["curl", "-s", "-f", "--max-time", "120", "-o", "-", http["boot_file"]])
            assert got.returncode == 0 and got.stdout == boot_file, (got.returncode, len(got.stdout))
            # a BIOS client there chain-loads iPXE, whose script passes the bootstrap's parameters (a
            # --tftp-root kernel: the bootstrap flow's)
            ipxe = in_client(["curl", "-s", "-f", "--max-time", "60", "-o", "-", "tftp://10.77.0.1/boot.ipxe"])
            assert ipxe.returncode == 0 and f"json {bootfiles.flow_cmdline()}\n" in ipxe.stdout.decode(), ipxe
        events = srv.events()
        assert any(e.get("giaddr") == "10.88.0.1" and str(e.get("msg", "")).startswith("lease ") for e in events)
        # the local subnet is still served from its own range, directly
        srv.net.add_veth_host("cl0", "")
        local = srv.net.run(["busybox", "udhcpc", "-i", "cl0", "-n", "-q", "-t", "5", "-T", "1", "-s", "/bin/true"],
                            capture_output=True, text=True, timeout=60)
        assert re.search(r"lease of 10\.77\.0\.1\d\d obtained", local.stdout + local.stderr)
