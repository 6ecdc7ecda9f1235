"""Device fail-over (issue 17 item 4): a gateway that dies in the middle of a fetch (stalls, or
refuses connections) is marked down for the rest of that fetch, so it costs one timeout, not one
per block. Counted in requests that reach the dead gateway, never in wall time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from cidboot.ipld.cid import CID, DAG_CBOR, RAW
from cidboot.ipld.dagcbor import encode
from cidboot.store.blockstore import Blockstore
from cidboot.store.gateway.client import BlockUnavailable, GatewayTimeout, fetch, fetch_block
from tests.support.gateway_fixtures import _serving, running_gateway

# Long enough that the live gateway never times out on a loaded machine (the unit tier runs in 4
# workers beside other work): then it too is marked down, and the dead one is asked again.
TIMEOUT = 2.0


@dataclass
class Dying:
    url: str = ""
    served: int = 0  # requests answered while alive
    after_death: int = 0  # requests that reached it once dead (each costs the client a timeout)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def dying_gateway(store: Blockstore, answers: int, stalls: int | None = None) -> Iterator[Dying]:
    """A block-only gateway (406 to CARs, so every block is its own request) that answers
    `answers` requests and then hangs: it accepts connections and never replies (`stalls`:
    only that many requests hang, then it answers again: a lossy link, not a dead server)."""
    state = Dying()
    stop = threading.Event()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            with state.lock:
                dead = state.served >= answers and (stalls is None or state.after_death < stalls)
                if dead:
                    state.after_death += 1
                else:
                    state.served += 1
            if dead:
                stop.wait(30)
                return
            if "format=raw" not in self.path:
                self.send_response(406)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = store.get(CID.parse(self.path.split("/")[2].split("?")[0]))
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.ipld.raw")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _serving(H, on_stop=stop.set) as url:
        state.url = url
        yield state


@pytest.fixture
def wide(tmp_path: Path) -> tuple[Blockstore, CID, list[CID]]:
    """A root linking 12 raw leaves: 13 blocks, each fetched alone from a block-only gateway."""
    store = Blockstore(tmp_path / "origin")
    leaves = [store.put_block(bytes([i]) * 2000, RAW) for i in range(12)]
    return store, store.put_block(encode({"leaves": leaves}), DAG_CBOR), leaves


def test_gateway_dying_mid_fetch_costs_one_timeout(wide: tuple[Blockstore, CID, list[CID]], tmp_path: Path) -> None:
    store, root, leaves = wide
    with running_gateway(store) as honest, dying_gateway(store, answers=4) as dying:
        local = Blockstore(tmp_path / "local")
        res = fetch(root, [dying.url, honest.url], local, timeout=TIMEOUT, backoff=0)
    assert all(local.has(c) for c in [root, *leaves])
    assert dying.served == 4  # root (406 + raw) and the first leaf (406 + raw) came from it
    assert dying.after_death == 1, f"the dead gateway was asked {dying.after_death} times"
    assert list(res.down) == [dying.url] and "stalled" in res.down[dying.url]
    assert sum(dying.url in e for e in res.errors) == 1 and not res.dropped


def test_refused_gateway_is_asked_once_per_fetch(wide: tuple[Blockstore, CID, list[CID]], tmp_path: Path) -> None:
    store, root, leaves = wide
    dead = "http://127.0.0.1:9"
    with running_gateway(store) as honest:
        res = fetch(root, [dead, honest.url], Blockstore(tmp_path / "local"), timeout=TIMEOUT, backoff=0)
    assert sum(dead in e for e in res.errors) == 1 and dead in res.down


def test_fetch_block_skips_a_dead_gateway_in_later_rounds(wide: tuple[Blockstore, CID, list[CID]],
                                                          tmp_path: Path) -> None:
    store, root, _ = wide
    empty = Blockstore(tmp_path / "empty")
    with running_gateway(empty) as has_nothing, dying_gateway(store, answers=0) as dying:
        with pytest.raises(BlockUnavailable) as e:
            fetch_block(root, [dying.url, has_nothing.url], Blockstore(tmp_path / "local"), timeout=TIMEOUT,
                        rounds=3, backoff=0)
    assert dying.after_death == 1  # one timeout in three rounds; the other gateway was asked each round
    assert sum(isinstance(c, GatewayTimeout) for c in e.value.causes) == 1


def test_every_gateway_down_gets_another_round(wide: tuple[Blockstore, CID, list[CID]], tmp_path: Path) -> None:
    store, root, _ = wide
    with dying_gateway(store, answers=0) as dying:
        with pytest.raises(BlockUnavailable):
            fetch_block(root, [dying.url], Blockstore(tmp_path / "local"), timeout=TIMEOUT, rounds=2, backoff=0)
    assert dying.after_death == 2  # alone and down: still asked each round, not failed without asking


def test_boot_config_lists_the_site_boot_server_first_then_the_fallbacks() -> None:
    from bootstrap.server.serve import boot_gateways
    from cidboot.netboot.bootconfig import BootConfig

    own = "http://10.77.0.1:8080"
    listed = boot_gateways(("self", "http://10.9.0.11:8080", "http://10.9.0.12:8080"), own)
    assert listed == (own, "http://10.9.0.11:8080", "http://10.9.0.12:8080")
    assert boot_gateways((), own) == (own,)
    cfg = BootConfig(CID.of(b"m", RAW), listed, {}, "device")
    assert BootConfig.decode(cfg.encode()).gateways == listed  # the order survives to the device


def test_a_lone_gateway_that_stalls_once_is_asked_again(wide: tuple[Blockstore, CID, list[CID]],
                                                       tmp_path: Path) -> None:
    store, root, leaves = wide
    with dying_gateway(store, answers=4, stalls=1) as lossy:
        local = Blockstore(tmp_path / "local")
        res = fetch(root, [lossy.url], local, timeout=TIMEOUT, rounds=1, backoff=0)
    assert all(local.has(c) for c in [root, *leaves])  # no other gateway: marked down, still used
    assert lossy.after_death == 1 and lossy.url in res.down
