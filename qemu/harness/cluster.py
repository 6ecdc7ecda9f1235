"""Isolated Kubo nodes and a real IPFS Cluster: one implementation for the lab and the tests.

`python -m qemu.harness boot --cluster K` starts K members inside the lab's network namespace;
the integration tests and benches (tests/support/cluster_node.py, kubo_node.py) start them on
the host's loopback. Either way a member is a Kubo daemon plus the `ipfs-cluster-service` peer
that drives it, in a temp dir, with random ports:

- Kubo: no bootstrap peers, MDNS off, routing none, AutoConf/AutoTLS/NAT mapping off, API and
  swarm on 127.0.0.1, a gateway that serves only what the node holds (`NoFetch`), and (for
  cluster members) a private swarm key with TCP only, so the nodes only know each other and are
  connected explicitly;
- cluster peers: CRDT consensus, a random private cluster secret, MDNS off, every peer's address
  given to every other peer (no DHT lookup), re-pinning ON (IPFS Cluster ships it off) and a
  1-s liveness ping, so a lost peer's pins are re-allocated in seconds.

The binaries are those `.ci/setup.sh` builds into $CIDBOOT_TOOLS (~/.cache/cidboot/bin).
Everything here runs in the calling thread's network namespace: the lab enters its namespace
(`qemu.harness.netns.inside`) before starting a cluster, so children inherit it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cidboot.errors import CidbootError
from cidboot.store.cluster import ClusterClient

PING = 1  # seconds between cluster liveness pings: a dead peer is noticed after ~2 pings


class ClusterLabError(CidbootError):
    """A Kubo node or cluster peer is missing, did not start, or did not join (message says which)."""


def tool(name: str) -> str:
    """Path of a pinned binary (`ipfs`, `ipfs-cluster-service`, `ipfs-cluster-ctl`)."""
    tools = os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin"))
    path = os.path.join(tools, name)
    if not os.access(path, os.X_OK):
        raise ClusterLabError(f"{name} not found at {path}: run `make setup` (.ci/setup.sh builds it)")
    return path


def isolated_config(api: int, gw: int, *, gateway_host: str = "127.0.0.1") -> dict[str, str]:
    """Kubo settings (`ipfs config --json KEY VALUE`) for a node that talks to nothing but
    loopback: API and gateway on the given ports, no bootstrap peers, no MDNS, no routing, no
    AutoConf/AutoTLS, no NAT port mapping, a gateway that serves only what the node holds.
    `gateway_host` 0.0.0.0 opens the gateway to a lab namespace's devices and boot servers."""
    return {
        "Addresses.API": f'"/ip4/127.0.0.1/tcp/{api}"',
        "Addresses.Gateway": f'"/ip4/{gateway_host}/tcp/{gw}"',
        "Addresses.Swarm": '["/ip4/127.0.0.1/tcp/0"]',
        "Bootstrap": "[]",
        "Discovery.MDNS.Enabled": "false",
        "Routing.Type": '"none"',
        "AutoConf.Enabled": "false",
        "AutoTLS.Enabled": "false",
        "Swarm.DisableNatPortMap": "true",
        "Gateway.NoFetch": "true",
    }


PRIVATE_NETWORK = {  # a private (swarm-key) network is TCP only
    "Swarm.Transports.Network.QUIC": "false",
    "Swarm.Transports.Network.WebTransport": "false",
    "Swarm.Transports.Network.WebRTCDirect": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KuboNode:
    binary: str
    repo: Path
    api_url: str
    gateway_url: str  # as seen from the same namespace (127.0.0.1)

    @property
    def gateway_port(self) -> int:
        return int(self.gateway_url.rsplit(":", 1)[1])

    def ipfs_bytes(self, *args: str) -> bytes:
        env = {**os.environ, "IPFS_PATH": str(self.repo)}
        out = subprocess.run([self.binary, *args], env=env, capture_output=True, timeout=300)
        if out.returncode:
            raise ClusterLabError(f"ipfs {' '.join(args)} failed: {out.stderr.decode()}")
        return out.stdout

    def ipfs(self, *args: str) -> str:
        return self.ipfs_bytes(*args).decode()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, *, method: str = "GET",
              timeout: float = 90) -> None:
    """Poll until `url` answers (the daemon is up), failing at once if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
                r.read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise ClusterLabError(f"{what} did not start: {log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """Stop a server process: SIGTERM, `grace` seconds to exit, then SIGKILL (the harness's
    boot servers, Kubo and Cluster peers, and the benches' servers all stop this way)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_kubo(workdir: Path, *, swarm_key: str | None = None,
               gateway_host: str = "127.0.0.1") -> tuple[KuboNode, subprocess.Popen[bytes]]:
    """A Kubo daemon in `workdir/kubo-repo`; with `swarm_key`, a member of that private network."""
    binary = tool("ipfs")
    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "kubo-repo"
    env = {**os.environ, "IPFS_PATH": str(repo)}
    if swarm_key:
        env["LIBP2P_FORCE_PNET"] = "1"
    subprocess.run([binary, "init", "--profile", "test", "--empty-repo"], env=env, check=True, capture_output=True)
    api, gw = free_port(), free_port()
    settings = isolated_config(api, gw, gateway_host=gateway_host)
    if swarm_key:
        (repo / "swarm.key").write_text(swarm_key)
        settings.update(PRIVATE_NETWORK)
    for key, value in settings.items():
        subprocess.run([binary, "config", "--json", key, value], env=env, check=True, capture_output=True)
    log = workdir / "kubo.log"
    proc = subprocess.Popen([binary, "daemon"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    node = KuboNode(binary, repo, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{gw}")
    wait_http(node.api_url + "/api/v0/version", proc, log, "Kubo daemon", method="POST", timeout=60)
    return node, proc


@dataclass
class ClusterPeer:
    """One member: a Kubo daemon and the cluster peer that drives it."""

    index: int
    kubo: KuboNode
    kubo_proc: subprocess.Popen[bytes]
    path: Path  # IPFS_CLUSTER_PATH
    peer_id: str
    rest_url: str
    cluster_addr: str  # /ip4/127.0.0.1/tcp/N/p2p/ID
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl_argv(self, *args: str) -> list[str]:
        """argv of `ipfs-cluster-ctl --host <this peer's REST API> ARGS` (run it in the peer's namespace)."""
        host = "/ip4/127.0.0.1/tcp/" + self.rest_url.rsplit(":", 1)[1]
        return [tool("ipfs-cluster-ctl"), "--host", host, *args]

    def ctl(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(self.ctl_argv(*args), capture_output=True, timeout=timeout)
        if out.returncode:
            raise ClusterLabError(f"ipfs-cluster-ctl {' '.join(args)}: {out.stderr.decode()}{out.stdout.decode()}")
        return out.stdout.decode()

    def kill(self) -> None:
        """SIGKILL both daemons: a peer lost without saying goodbye."""
        for p in (self.proc, self.kubo_proc):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)

    def stop(self) -> None:
        for p in (self.proc, self.kubo_proc):
            if p is not None:
                stop(p)


@dataclass
class Cluster:
    peers: list[ClusterPeer] = field(default_factory=list)

    def live(self) -> list[ClusterPeer]:
        return [p for p in self.peers if p.alive]

    def by_id(self, peer_id: str) -> ClusterPeer:
        return next(p for p in self.peers if p.peer_id == peer_id)

    def stop(self) -> None:
        for p in self.peers:
            p.stop()


def _init_cluster_peer(path: Path, index: int, secret: str, kubo: KuboNode,
                       rest_host: str = "127.0.0.1") -> tuple[str, int, int]:
    env = {**os.environ, "IPFS_CLUSTER_PATH": str(path)}
    subprocess.run([tool("ipfs-cluster-service"), "init", "--consensus", "crdt", "--force"], env=env,
                   check=True, capture_output=True, timeout=60)
    cfg_file = path / "service.json"
    cfg = json.loads(cfg_file.read_text())
    rest, swarm = free_port(), free_port()
    c = cfg["cluster"]
    c.update({
        "peername": f"peer{index}", "secret": secret,
        "listen_multiaddress": [f"/ip4/127.0.0.1/tcp/{swarm}"],
        "announce_multiaddress": [], "no_announce_multiaddress": [],
        "mdns_interval": "0s", "enable_relay_hop": False,
        "disable_repinning": False, "monitor_ping_interval": f"{PING}s", "peer_watch_interval": "1s",
        "replication_factor_min": -1, "replication_factor_max": -1,
    })
    c["pubsub"]["heartbeat_interval"] = "200ms"
    c["pubsub"]["flood_publish"] = True
    cfg["consensus"]["crdt"].update({"trusted_peers": ["*"], "rebroadcast_interval": "2s"})
    cfg["consensus"]["crdt"]["batching"] = {"max_batch_size": 0, "max_batch_age": "0s"}
    cfg["api"]["restapi"]["http_listen_multiaddress"] = f"/ip4/{rest_host}/tcp/{rest}"
    for other in ("ipfsproxy", "pinsvcapi"):  # not used here: keep them off the network
        if other in cfg["api"]:
            cfg["api"][other]["listen_multiaddress" if other == "ipfsproxy" else "http_listen_multiaddress"] = (
                f"/ip4/127.0.0.1/tcp/{free_port()}")
    api_port = kubo.api_url.rsplit(":", 1)[1]
    cfg["ipfs_connector"]["ipfshttp"].update({
        "node_multiaddress": f"/ip4/127.0.0.1/tcp/{api_port}", "connect_swarms_delay": "1s",
    })
    for inf in cfg.get("informer", {}).values():
        if isinstance(inf, dict) and "metric_ttl" in inf:
            inf["metric_ttl"] = "2s"
    if "pubsubmon" in cfg.get("monitor", {}):
        cfg["monitor"]["pubsubmon"]["check_interval"] = "1s"
    cfg_file.write_text(json.dumps(cfg, indent=2))
    peer_id = json.loads((path / "identity.json").read_text())["id"]
    return peer_id, rest, swarm


def start_cluster(workdir: Path, k: int, *, gateway_host: str = "127.0.0.1", rest_host: str = "127.0.0.1") -> Cluster:
    """K members; returns once every peer sees K peers and every Kubo node is connected to the others.
    `gateway_host`/`rest_host` 0.0.0.0 open the Kubo gateways / cluster REST APIs to a lab
    namespace's devices (which publish their results there); the Kubo RPC stays on loopback."""
    secret = secrets.token_hex(32)
    swarm_key = "/key/swarm/psk/1.0.0/\n/base16/\n" + secrets.token_hex(32) + "\n"
    cluster = Cluster()
    try:
        for i in range(k):
            d = workdir / f"member{i}"
            d.mkdir(parents=True)
            kubo, kproc = start_kubo(d, swarm_key=swarm_key, gateway_host=gateway_host)
            cpath = d / "cluster"
            peer_id, rest, swarm = _init_cluster_peer(cpath, i, secret, kubo, rest_host)
            addr = f"/ip4/127.0.0.1/tcp/{swarm}/p2p/{peer_id}"
            cluster.peers.append(ClusterPeer(i, kubo, kproc, cpath, peer_id, f"http://127.0.0.1:{rest}", addr))
        for p in cluster.peers:  # every peer knows every address: no DHT lookup before the first pin
            cfg_file = p.path / "service.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["cluster"]["peer_addresses"] = [o.cluster_addr for o in cluster.peers if o is not p]
            cfg_file.write_text(json.dumps(cfg, indent=2))
        kubo_addrs = []
        for p in cluster.peers:
            ident = json.loads(p.kubo.ipfs("id"))
            kubo_addrs.append(next(a for a in ident["Addresses"] if "/tcp/" in a))
        for i, p in enumerate(cluster.peers):
            for a in kubo_addrs[i + 1:]:
                p.kubo.ipfs("swarm", "connect", a)
        for p in cluster.peers:
            env = {**os.environ, "IPFS_CLUSTER_PATH": str(p.path)}
            cmd = [tool("ipfs-cluster-service"), "daemon"]
            if p.index:
                cmd += ["--bootstrap", cluster.peers[0].cluster_addr]
            log = p.path / "daemon.log"
            p.proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
            wait_http(p.rest_url + "/id", p.proc, log, f"ipfs-cluster-service peer{p.index}")
        deadline = time.monotonic() + 60
        for p in cluster.peers:
            while len([x for x in ClusterClient(p.rest_url).peers() if not x.error]) < k:
                if time.monotonic() > deadline:
                    raise ClusterLabError(f"peer{p.index} does not see {k} peers: {p.ctl('peers', 'ls')}")
                time.sleep(0.5)
        return cluster
    except BaseException:
        cluster.stop()
        raise
