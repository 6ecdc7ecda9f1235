"""`bootstrap serve`: the boot server (DHCP or ProxyDHCP, TFTP, HTTP gateway) on one interface."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import threading
from pathlib import Path

from bootstrap.server.devices import Devices
from bootstrap.server.serve import BootServer, ServeConfig
from cidboot.cli import UsageError, listen_error
from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID


def _interface_ip(ifname: str) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise CidbootError(f"no interface {ifname!r}")
        for a in ipr.get_addr(index=idx[0], family=2):
            return str(a.get_attr("IFA_ADDRESS"))
    raise CidbootError(f"interface {ifname} has no IPv4 address")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve network boot: DHCP/ProxyDHCP, TFTP, HTTP gateway", description=__doc__)
    p.add_argument("--interface", required=True, help="interface facing the devices")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dhcp-range", metavar="FIRST-LAST", help="be the DHCP server for this range")
    mode.add_argument("--proxy-dhcp", action="store_true", help="only add PXE boot info next to an existing DHCP server")
    p.add_argument("--store", required=True, type=Path, help="block store to serve")
    p.add_argument("--manifest", required=True, help="manifest CID devices boot unless devices.yaml says otherwise")
    p.add_argument("--devices", type=Path, help="devices.yaml: per-MAC/UUID role, manifest, allow/deny")
    p.add_argument("--tftp-root", type=Path, default=Path("/srv/cidboot/tftp"), help="static boot files")
    p.add_argument("--tftp-port", type=int, default=69)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--trust-anchor", type=Path, help="root-of-trust file put into every boot config")
    p.add_argument("--state-dir", type=Path, help="where leases are persisted")
    p.add_argument("--agent-port", type=int, default=8000,
                   help="port of the agents' API, for the peer URLs in boot configs (devices.yaml `ip:`)")
    p.add_argument("--gateway", action="append", default=[], metavar="URL",
                   help="gateway URL boot configs list for devices, in order (repeatable; default: this server's own; "
                        "'self' stands for it)")
    p.add_argument("--device-registry", metavar="CID", help="signed device registry put into every boot config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dhcp_range = None
    if args.dhcp_range:
        first, sep, last = args.dhcp_range.partition("-")
        try:
            ipaddress.IPv4Address(first)
            ipaddress.IPv4Address(last)
        except ValueError:
            raise UsageError(f"--dhcp-range must be FIRST-LAST IPv4 addresses, got {args.dhcp_range!r}") from None
        dhcp_range = (first, last)
    anchor = None
    if args.trust_anchor:
        import json

        anchor = json.loads(args.trust_anchor.read_text())
    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    cfg = ServeConfig(args.interface, _interface_ip(args.interface), args.store, CID.parse(args.manifest), args.tftp_root,
                      dhcp_range, args.http_port, args.tftp_port, Devices.load(args.devices) if args.devices else None,
                      anchor, args.state_dir, args.agent_port,
                      CID.parse(args.device_registry) if args.device_registry else None, tuple(args.gateway))
    try:
        server = BootServer(cfg)
    except OSError as e:  # a bind: the error does not say which of the three servers' ports
        where = (f"{cfg.server_ip} (one of UDP 67/4011 for DHCP, UDP {args.tftp_port} for TFTP, "
                 f"TCP {args.http_port} for HTTP)")
        raise listen_error(e, cfg.server_ip, args.http_port, "serve", where=where) from None
    server.start()
    print(f"serving on {args.interface} ({cfg.server_ip}): {'DHCP ' + args.dhcp_range if dhcp_range else 'ProxyDHCP'}, "
          f"TFTP :{server.tftp.port}, HTTP {server.gateway_url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0
