"""`bootstrap serve`: the boot server (DHCP or ProxyDHCP, TFTP, HTTP gateway) on one interface.

Works out of the box for a manifest: the boot files every client architecture needs are made or
found at start (bootstrap.bootfiles: the bootstrap kernel, initrd and x86_64 UKI built with the
manifest's root as their trust anchor, cached by CID under the state dir; `undionly.kpxe` from
Debian's ipxe package); a missing one stops the server with its name and the package to install.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
from pathlib import Path

from bootstrap import bootfiles
from bootstrap.server.devices import Devices
from bootstrap.server.serve import BootServer, ServeConfig, open_store
from cidboot.cli import UsageError, listen_error
from cidboot.errors import CidbootError
from cidboot.ipld.cid import CID
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.upstream import parse_size
from cidboot.trust.manifest import RootOfTrust


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
    mode.add_argument("--dhcp-range", metavar="FIRST-LAST[/PREFIX]", action="append",
                      help="be the DHCP server for this range (repeatable, one per subnet: the one holding the "
                           "interface's address is local, the others are served through DHCP relays; PREFIX "
                           "default 24)")
    mode.add_argument("--proxy-dhcp", action="store_true", help="only add PXE boot info next to an existing DHCP server")
    p.add_argument("--store", required=True, type=Path, help="block store to serve")
    p.add_argument("--manifest", required=True, help="manifest CID devices boot unless devices.yaml says otherwise")
    p.add_argument("--devices", type=Path, help="devices.yaml: per-MAC/UUID role, manifest, allow/deny")
    p.add_argument("--tftp-root", type=Path,
                   help="boot files that override the built ones (same names: undionly.kpxe, bootstrap-x86_64.efi, "
                        "bootstrap/vmlinuz, bootstrap/initrd.img), and any other files to serve")
    p.add_argument("--arch", action="append", choices=tuple(bootfiles.ARCH_FILES), metavar="ARCH",
                   help="device architecture to offer boot files for: x86_64 (BIOS via iPXE, and UEFI), arm64 (UEFI); "
                        "repeat for more (default: all). Each one's bootstrap is built at start unless --tftp-root "
                        "has it, which needs the Debian mirror the first time; devices of another architecture get "
                        "no offer, and the log says so")
    p.add_argument("--tftp-port", type=int, default=69)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--trust-anchor", type=Path, help="root-of-trust file put into every boot config")
    p.add_argument("--state-dir", type=Path,
                   help="where leases are persisted and built boot files cached (default for the cache: "
                        "~/.cache/cidboot/serve)")
    p.add_argument("--agent-port", type=int, default=8000,
                   help="port of the agents' API, for the peer URLs in boot configs (devices.yaml `ip:`)")
    p.add_argument("--gateway", action="append", default=[], metavar="URL",
                   help="gateway URL boot configs list for devices, in the order they try them (repeatable; default: "
                        "this server's own; 'self' stands for it: `--gateway self --gateway URL` puts the site's boot "
                        "server first and URL as the fall-back)")
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="gateway to fetch blocks missing from --store from, in order (repeatable: cluster members' "
                        "Kubo gateways, other boot servers); every block is verified against its CID and cached")
    p.add_argument("--cache-size", default="8G", metavar="SIZE",
                   help="with --upstream: most bytes of unpinned blocks kept in --store, least recently used "
                        "evicted first; pinned DAGs never are (default 8G; K/M/G/T)")
    p.add_argument("--upstream-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="deadline per block asked of an upstream; one that misses it is skipped for 30 s (default 10)")
    p.add_argument("--pin-manifest", action="store_true",
                   help="fetch the --manifest's whole DAG at start (in the background, through --upstream) and pin "
                        "it: never evicted, and the site boots it with its uplink down")
    p.add_argument("--device-registry", metavar="CID", help="signed device registry put into every boot config")
    p.add_argument("--publish", metavar="cluster=URL[,replication=MIN:MAX]",
                   help="where agents publish results, provenance and audit logs, put into every boot config: an "
                        "IPFS Cluster REST API (cluster=URL) or one Kubo RPC (kubo=URL) as devices reach it")
    keys = p.add_argument_group("private images (docs/privacy.md)")
    where = keys.add_mutually_exclusive_group()
    where.add_argument("--key-policy", type=Path, metavar="FILE",
                       help="run the key broker on this server's HTTP port (/keys/*) with this key policy (JSON) and "
                            "name it in every boot config (`keys`): devices get the layer keys of encrypted manifests "
                            "when their evidence appraises as the policy asks. Needs --flow-secret and "
                            "--device-registry (the devices and roles the broker trusts)")
    where.add_argument("--keys", metavar="URL", dest="keys_url",
                       help="a key broker running elsewhere (`bootstrap keys --listen`), named in every boot config")
    keys.add_argument("--flow-secret", action="append", default=[], metavar="[NAME=]FILE",
                      help="flow secret for the manifests named NAME (default: --manifest's name); repeatable")
    keys.add_argument("--key-log", type=Path, metavar="FILE",
                      help="the broker's decision log, one JSON line per release or refusal (default: "
                           "STATE_DIR/keys.log)")
    p.set_defaults(func=run)


def key_broker(args: argparse.Namespace, store: Blockstore) -> object | None:
    """The key broker `--key-policy` asks for (cidboot.trust.private.broker), holding the
    manifests this server boots whose names have a flow secret, or None. Devices and roles come
    from the signed device registry, verified under the trust anchor (docs/privacy.md)."""
    from cidboot.netboot.bootconfig import BootConfigError, parse_keys
    from cidboot.trust.keys import load_root
    from cidboot.trust.manifest import SignedManifest
    from cidboot.trust.private.broker import JsonLinesLog, KeyBroker, Policy
    from cidboot.trust.private.keys import load_secret
    from cidboot.trust.registry import verify_signed_registry

    if args.keys_url is not None:
        try:
            parse_keys(args.keys_url)
        except BootConfigError as e:
            raise UsageError(f"--keys: {e}") from None
    if args.key_policy is None:
        if args.flow_secret:
            raise UsageError("--flow-secret is for the key broker: give --key-policy too")
        return None
    if not args.flow_secret:
        raise UsageError("--key-policy needs --flow-secret (the secret the layer keys are derived from)")
    if not args.device_registry:
        raise UsageError("--key-policy needs --device-registry: the broker takes devices and roles from the signed registry")
    log_path = args.key_log or (args.state_dir / "keys.log" if args.state_dir else None)
    if log_path is None:
        raise UsageError("--key-policy needs --key-log FILE or --state-dir (where decisions are logged)")
    where = f"{args.store} or its upstreams" if args.upstream else str(args.store)
    root = load_root(args.trust_anchor) if args.trust_anchor else manifest_root(store, args.manifest, where)
    default = SignedManifest.decode(store.get(CID.parse(args.manifest)))
    secrets: dict[str, bytes] = {}
    for v in args.flow_secret:
        name, sep, path = v.rpartition("=")
        secrets[name if sep else default.manifest.name] = load_secret(path)
    reg = verify_signed_registry(store.get(CID.parse(args.device_registry)), root)
    broker = KeyBroker(reg.roots, Policy.load(args.key_policy), secrets, log=JsonLinesLog(log_path),
                       tpm_references=reg.tpm_references)
    cids = [args.manifest] + [pol.manifest for pol in (Devices.load(args.devices).by_mac.values() if args.devices else [])
                              if pol.manifest]
    logger = logging.getLogger("bootstrap.serve")
    for c in dict.fromkeys(cids):
        signed = default if c == args.manifest else SignedManifest.decode(store.get(CID.parse(c)))
        if signed.manifest.name in secrets:
            broker.add_manifest(signed, root, CID.parse(c))
            logger.info("key broker: serving the keys of %s v%d (%s), decisions in %s", signed.manifest.name,
                        signed.manifest.version, c, log_path)
    return broker


def parse_range(text: str) -> tuple[str, str, int]:
    """FIRST-LAST[/PREFIX] -> (first, last, prefix); both ends in the one subnet."""
    rng, _, pfx = text.partition("/")
    first, _, last = rng.partition("-")
    try:
        prefix = int(pfx) if pfx else 24
        net = ipaddress.IPv4Network(f"{first}/{prefix}", strict=False)
        if ipaddress.IPv4Address(last) not in net:
            raise ValueError(f"{last} is not in {net}")
    except ValueError as e:
        raise UsageError(f"--dhcp-range must be FIRST-LAST[/PREFIX] in one subnet, got {text!r}: {e}") from None
    return first, last, prefix


def manifest_root(store: Blockstore, manifest: str, where: str) -> RootOfTrust:
    """The root of trust of `manifest`, read through `store` (a caching store fetches the
    manifest block from its upstreams, verified): the anchor the bootstrap is built for."""
    from cidboot.trust.manifest import SignedManifest

    try:
        return SignedManifest.decode(store.get(CID.parse(manifest))).manifest.root
    except (CidbootError, OSError) as e:
        raise CidbootError(f"cannot build the bootstrap: manifest {manifest} in {where}: {e}") from None


def boot_files(args: argparse.Namespace, cache: Path, store: Blockstore) -> dict[str, Path]:
    """Every boot file the server offers, made or found for the manifest (exits naming a missing one)."""
    names = bootfiles.served_names(args.arch or bootfiles.ARCH_FILES)

    def anchor() -> RootOfTrust:
        return manifest_root(store, args.manifest, f"{args.store} or its upstreams" if args.upstream else str(args.store))

    def say(msg: str) -> None:
        logging.getLogger("bootstrap.serve").info(msg)

    files = bootfiles.resolve(names, overrides=args.tftp_root, anchor=anchor, cache=cache, say=say)
    for name, path in files.items():
        say(f"boot file {name}: {path}")
    return files


def run(args: argparse.Namespace) -> int:
    ranges = [parse_range(r) for r in args.dhcp_range or []]
    try:
        cache_max = parse_size(args.cache_size)
    except ValueError as e:
        raise UsageError(f"--cache-size: {e}") from None
    if args.gateway and "self" not in args.gateway:
        logging.getLogger("bootstrap.serve").warning(
            "boot configs will list only %s, not this server: add `--gateway self` (first) for devices to use it",
            ", ".join(args.gateway))
    for url in args.upstream:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--upstream must be an http(s):// gateway URL, got {url!r}")
    publish = None
    if args.publish:
        from cidboot.netboot.bootconfig import BootConfigError, parse_publish

        try:
            publish = parse_publish(args.publish)
        except BootConfigError as e:
            raise UsageError(f"--publish: {e}") from None
    ip = _interface_ip(args.interface)
    local = next((r for r in ranges if ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(f"{r[0]}/{r[2]}", strict=False)),
                 ranges[0] if ranges else None)
    dhcp_range = (local[0], local[1]) if local else None
    netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{local[2]}").netmask) if local else "255.255.255.0"
    relays = tuple(r for r in ranges if r is not local)
    anchor = None
    if args.trust_anchor:
        import json

        anchor = json.loads(args.trust_anchor.read_text())
    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ["CIDBOOT_BOOTFILES_CACHE"]) if os.environ.get("CIDBOOT_BOOTFILES_CACHE") else \
        (args.state_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cidboot" / "serve") \
        / "bootfiles"
    cfg = ServeConfig(args.interface, ip, args.store, CID.parse(args.manifest), args.tftp_root,
                      dhcp_range, args.http_port, args.tftp_port, Devices.load(args.devices) if args.devices else None,
                      anchor, args.state_dir, args.agent_port,
                      CID.parse(args.device_registry) if args.device_registry else None, tuple(args.gateway),
                      relay_ranges=relays, netmask=netmask, upstreams=tuple(args.upstream),
                      cache_max=cache_max, upstream_timeout=args.upstream_timeout, pin_manifest=args.pin_manifest,
                      publish=publish)
    store = open_store(cfg)
    cfg.key_broker, cfg.keys_url = key_broker(args, store), args.keys_url
    cfg.boot_files = boot_files(args, cache, store)  # the manifest may come from an upstream
    kernel = cfg.boot_files.get(bootfiles.KERNEL_NAME)  # none when x86_64 is not offered: no iPXE boots
    if kernel is not None:
        cfg.bootstrap_cmdline = bootfiles.bootstrap_cmdline(kernel)
        logging.getLogger("bootstrap.serve").info("boot.ipxe passes the bootstrap's kernel parameters: %s",
                                                  cfg.bootstrap_cmdline)
    try:
        server = BootServer(cfg, store)
    except OSError as e:  # a bind: the error does not say which of the three servers' ports
        where = (f"{cfg.server_ip} (one of UDP 67/4011 for DHCP, UDP {args.tftp_port} for TFTP, "
                 f"TCP {args.http_port} for HTTP)")
        raise listen_error(e, cfg.server_ip, args.http_port, "serve", where=where) from None
    server.start()
    print(f"serving on {args.interface} ({cfg.server_ip}): {'DHCP ' + ' '.join(args.dhcp_range) if dhcp_range else 'ProxyDHCP'}, "
          f"TFTP :{server.tftp.port}, HTTP {server.gateway_url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0
