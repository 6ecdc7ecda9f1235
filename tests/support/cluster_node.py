"""A real, isolated IPFS Cluster for interop tests (pytest plugin, loaded by conftest.py).

K Kubo daemons and K `ipfs-cluster-service` peers, all on 127.0.0.1 with random ports in
temp dirs: the Kubo nodes have no bootstrap peers, MDNS off, routing none and a private swarm
key (they only know each other, connected explicitly); the cluster peers use CRDT consensus,
a random private cluster secret, MDNS off and bootstrap to the first peer only. Repinning is
on (IPFS Cluster's default is off) and the liveness ping short, so a killed peer's pins are
re-allocated in seconds. The binaries are those `.ci/setup.sh` builds into $CIDBOOT_TOOLS.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cidboot.store.cluster import ClusterClient
from tests.support.kubo_node import KuboNode, free_port, isolated_config, kubo_binary

PING = 1  # seconds between cluster liveness pings: a dead peer is noticed after ~2 pings


def tool(name: str) -> str:
    tools = os.environ.get("CIDBOOT_TOOLS", os.path.expanduser("~/.cache/cidboot/bin"))
    path = os.path.join(tools, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found at {path}: run `make setup` (.ci/setup.sh builds it)")
    return path


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, *, method: str = "GET",
               timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
                r.read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"{what} did not start: {log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


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

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`ipfs-cluster-ctl --host <this peer's REST API> ARGS`."""
        host = "/ip4/127.0.0.1/tcp/" + self.rest_url.rsplit(":", 1)[1]
        out = subprocess.run([tool("ipfs-cluster-ctl"), "--host", host, *args], capture_output=True, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"ipfs-cluster-ctl {' '.join(args)}: {out.stderr.decode()}{out.stdout.decode()}")
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
                _stop(p)


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


def _start_kubo(workdir: Path, swarm_key: str) -> tuple[KuboNode, subprocess.Popen[bytes]]:
    binary = kubo_binary()
    repo = workdir / "kubo-repo"
    env = {**os.environ, "IPFS_PATH": str(repo), "LIBP2P_FORCE_PNET": "1"}
    subprocess.run([binary, "init", "--profile", "test", "--empty-repo"], env=env, check=True, capture_output=True)
    (repo / "swarm.key").write_text(swarm_key)
    api, gw = free_port(), free_port()
    settings = {**isolated_config(api, gw),
                "Swarm.Transports.Network.QUIC": "false",  # a private network is TCP only
                "Swarm.Transports.Network.WebTransport": "false",
                "Swarm.Transports.Network.WebRTCDirect": "false"}
    for key, value in settings.items():
        subprocess.run([binary, "config", "--json", key, value], env=env, check=True, capture_output=True)
    log = workdir / "kubo.log"
    proc = subprocess.Popen([binary, "daemon"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    node = KuboNode(binary, repo, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{gw}")
    _wait_http(node.api_url + "/api/v0/version", proc, log, "Kubo daemon", method="POST", timeout=60)
    return node, proc


def _init_cluster_peer(path: Path, index: int, secret: str, kubo: KuboNode) -> tuple[str, int, int]:
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
    cfg["api"]["restapi"]["http_listen_multiaddress"] = f"/ip4/127.0.0.1/tcp/{rest}"
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


def start_cluster(workdir: Path, k: int) -> Cluster:
    """K members; returns once every peer sees K peers and every Kubo node is connected to the others."""
    secret = secrets.token_hex(32)
    swarm_key = "/key/swarm/psk/1.0.0/\n/base16/\n" + secrets.token_hex(32) + "\n"
    cluster = Cluster()
    try:
        for i in range(k):
            d = workdir / f"member{i}"
            d.mkdir()
            kubo, kproc = _start_kubo(d, swarm_key)
            cpath = d / "cluster"
            peer_id, rest, swarm = _init_cluster_peer(cpath, i, secret, kubo)
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
            _wait_http(p.rest_url + "/id", p.proc, log, f"ipfs-cluster-service peer{p.index}")
        deadline = time.monotonic() + 60
        for p in cluster.peers:
            while len([x for x in ClusterClient(p.rest_url).peers() if not x.error]) < k:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"peer{p.index} does not see {k} peers: {p.ctl('peers', 'ls')}")
                time.sleep(0.5)
        return cluster
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], Cluster]]:
    """`cluster_factory(3)`: a fresh K-member cluster, stopped after the test."""
    started: list[Cluster] = []

    def make(k: int) -> Cluster:
        c = start_cluster(tmp_path_factory.mktemp("cluster"), k)
        started.append(c)
        return c

    try:
        yield make
    finally:
        for c in started:
            c.stop()
