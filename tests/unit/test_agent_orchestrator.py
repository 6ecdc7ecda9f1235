"""The orchestrator as agent.peers and agent.device drive it: two roles wired through
`send`/`accept`, inputs arriving from another thread, unique input sets, operation loading,
sync operations off the event loop, and stopping a run that waits for peers.

(DFFML semantics, refusals and the audit log are covered in test_agent_flow.py; this file
covers the orchestrator's own contract with its callers.)"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.attested import AttestedAgents
from agent.audit import MemoryBlocks
from agent.orchestrator import Block, FlowContext, Orchestrator, load_operations
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import decode, make_input
from cidboot.errors import FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import keys
from cidboot.trust.cose import PrivateKey
from cidboot.trust.cose_key import raw_public_bytes

TWO_DEVICE = {
    "definitions": {"count": {"primitive": "int"}, "readings": {"primitive": "array"}, "total": {"primitive": "int"}},
    "operations": {
        "sample": {"implementation": "ops:sample", "inputs": {"count": "count"}, "outputs": {"readings": "readings"}},
        "summarise": {"implementation": "ops:summarise", "inputs": {"readings": "readings"},
                      "outputs": {"total": "total"}, "stage": "output"}},
    "seed": [{"definition": "count", "value": 5}],
    "flow": {"sample": {"inputs": {"count": ["seed"]}}, "summarise": {"inputs": {"readings": [{"sample": "readings"}]}}},
}
PLACEMENT = {"sensor": ["sample"], "aggregator": ["summarise"]}
EXPECTED = sum((i * 7) % 10 for i in range(5))


def sample(count: int) -> dict[str, Any]:
    return {"readings": [(i * 7) % 10 for i in range(count)]}


def summarise(readings: list[int]) -> dict[str, Any]:
    return {"total": sum(readings)}


def flow_and_cid(doc: dict[str, Any]) -> tuple[DataFlow, CID]:
    return DataFlow.from_obj(doc), CID.of(dagcbor.encode(doc), DAG_CBOR)


def agent(flow: DataFlow, fcid: CID, role: str, key: PrivateKey, peers: dict[str, PrivateKey],
          authority: PrivateKey, **kw: Any) -> Orchestrator:
    """One role's orchestrator, its peers registered as after mutual attestation."""
    attested = AttestedAgents()
    for peer_role, peer_key in peers.items():
        attested.add_self(raw_public_bytes(peer_key.public_key()), peer_role)
    ctx = FlowContext(flow, fcid, role, key, PLACEMENT,
                      authority_keys=frozenset({raw_public_bytes(authority.public_key())}), seed_key=authority)
    return Orchestrator(ctx, {"sample": sample, "summarise": summarise}, MemoryBlocks(), attested=attested, **kw)


def sensor_blocks(fcid: CID, sensor: PrivateKey, authority: PrivateKey) -> tuple[list[Block], CID]:
    seed_cid, seed = make_input(value=5, definition="count", flow=fcid, parents=[fcid], key=authority)
    cid, block = make_input(value=sample(5)["readings"], definition="readings", flow=fcid, parents=[seed_cid],
                            key=sensor, operation="sample", output="readings")
    return [(seed_cid, seed), (cid, block)], cid


def test_two_roles_through_send_and_accept() -> None:
    """Only placed operations run locally; an output another role consumes is sent to that role
    (and no other) with its provenance closure, and the receiver validates and runs it."""
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ks, ka = keys.generate(), keys.generate(), keys.generate()
    sensor = agent(flow, fcid, "sensor", ks, {"aggregator": ka}, authority)
    aggregator = agent(flow, fcid, "aggregator", ka, {"sensor": ks}, authority, remote_wait=10)
    sent: list[tuple[str, list[CID]]] = []

    def send(role: str, blocks: list[Block]) -> None:
        sent.append((role, [c for c, _ in blocks]))
        assert role == "aggregator"
        aggregator.accept(blocks, None)

    sensor.send = send

    async def both() -> tuple[list[Any], list[Any]]:
        return await asyncio.gather(sensor.run(), aggregator.run())

    s_res, a_res = asyncio.run(both())
    assert [(r.definition, r.operation) for r in s_res] == [("readings", "sample")]
    assert [(r.definition, r.value) for r in a_res] == [("total", EXPECTED)]
    ((role, cids),) = sent
    readings = s_res[0].cid
    seed = decode(sensor.store.get(readings)).parents[0]
    assert role == "aggregator" and set(cids) == {readings, seed}  # the node + its ancestry, not the flow
    assert [e.decision for e in aggregator.audit.entries] == ["accepted", "run", "result"]
    assert aggregator.audit.entries[0].inputs == [readings]
    assert decode(aggregator.store.get(a_res[0].cid)).parents == (readings,)


def test_accept_from_another_thread_while_the_run_waits() -> None:
    """agent.peers calls accept() from its HTTP server thread; the run picks the input up."""
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ks, ka = keys.generate(), keys.generate(), keys.generate()
    aggregator = agent(flow, fcid, "aggregator", ka, {"sensor": ks}, authority, remote_wait=10)
    blocks, cid = sensor_blocks(fcid, ks, authority)
    admitted: list[list[CID]] = []

    def later() -> None:
        while not aggregator.idle:
            time.sleep(0.01)
        admitted.append(aggregator.accept(blocks, None))

    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    res = asyncio.run(aggregator.run())
    t.join(5)
    assert [(r.definition, r.value) for r in res] == [("total", EXPECTED)]
    assert admitted == [[cid]] and time.monotonic() - t0 < 5


def test_the_same_input_twice_runs_once() -> None:
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ks, ka = keys.generate(), keys.generate(), keys.generate()
    aggregator = agent(flow, fcid, "aggregator", ka, {"sensor": ks}, authority, remote_wait=0)
    blocks, cid = sensor_blocks(fcid, ks, authority)
    assert aggregator.accept(blocks, None) == [cid]
    aggregator.accept(blocks, None)
    assert [r.value for r in asyncio.run(aggregator.run())] == [EXPECTED]
    assert len(aggregator.audit.find("run")) == 1


def test_every_complete_input_set_runs_once() -> None:
    """Two parameters with two inputs each: the four combinations, each exactly once."""
    doc = {"definitions": {"a": {"primitive": "int"}, "b": {"primitive": "int"}, "c": {"primitive": "int"}},
           "operations": {"add": {"implementation": "m:add", "inputs": {"x": "a", "y": "b"}, "outputs": {"z": "c"}}},
           "seed": [{"definition": "a", "value": 1}, {"definition": "a", "value": 2},
                    {"definition": "b", "value": 10}, {"definition": "b", "value": 20}]}
    flow, fcid = flow_and_cid(doc)
    calls: list[tuple[int, int]] = []

    def add(x: int, y: int) -> dict[str, int]:
        calls.append((x, y))
        return {"z": x + y}

    o = Orchestrator(FlowContext(flow, fcid, "dev", keys.generate()), {"add": add}, MemoryBlocks())
    res = asyncio.run(o.run())
    assert sorted(calls) == [(1, 10), (1, 20), (2, 10), (2, 20)]
    assert sorted(r.value for r in res) == [11, 12, 21, 22]
    assert len({r.cid for r in res}) == 4


def test_sync_operations_run_off_the_event_loop() -> None:
    """A blocking operation runs in a worker thread: two of them overlap, the loop stays free."""
    doc = {"definitions": {"n": {"primitive": "int"}, "out": {"primitive": "int"}},
           "operations": {"slow_a": {"implementation": "m:slow", "inputs": {"n": "n"}, "outputs": {"out": "out"}},
                          "slow_b": {"implementation": "m:slow", "inputs": {"n": "n"}, "outputs": {"out": "out"}}},
           "seed": [{"definition": "n", "value": 1}]}
    flow, fcid = flow_and_cid(doc)

    def slow(n: int) -> dict[str, int]:
        time.sleep(0.3)
        return {"out": n}

    o = Orchestrator(FlowContext(flow, fcid, "dev", keys.generate()), {"slow_a": slow, "slow_b": slow}, MemoryBlocks())
    t0 = time.monotonic()
    assert len(asyncio.run(o.run())) == 2
    assert time.monotonic() - t0 < 0.55


def test_stop_ends_a_run_that_waits_for_peers() -> None:
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ka = keys.generate(), keys.generate()
    aggregator = agent(flow, fcid, "aggregator", ka, {}, authority, remote_wait=30)

    async def go() -> list[Any]:
        task = asyncio.create_task(aggregator.run())
        while not aggregator.idle:
            await asyncio.sleep(0.01)
        aggregator.stop()
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(go()) == []
    assert aggregator.audit.entries == []


def test_a_block_that_does_not_hash_to_its_cid_is_refused() -> None:
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ks, ka = keys.generate(), keys.generate(), keys.generate()
    aggregator = agent(flow, fcid, "aggregator", ka, {"sensor": ks}, authority, remote_wait=0)
    blocks, cid = sensor_blocks(fcid, ks, authority)
    (seed_cid, seed), (_, block) = blocks
    assert aggregator.accept([(seed_cid, seed), (cid, block + b"\x00")], None) == []
    (r,) = aggregator.audit.find("refused")
    assert r.inputs == [cid] and "TamperedInput" in r.reason
    assert asyncio.run(aggregator.run()) == []


def test_load_operations_keeps_each_directory_apart(tmp_path: Path) -> None:
    """Two flows' `ops` modules in one process never shadow each other; a missing function is
    a precise error naming the operation and its implementation."""
    flow = DataFlow.from_obj({"definitions": {"n": {"primitive": "int"}},
                              "operations": {"f": {"implementation": "ops:f", "inputs": {"n": "n"},
                                                   "outputs": {"n2": "n"}}}})
    for name, value in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ops.py").write_text(f"def f(n):\n    return {{'n2': {value}}}\n")
    one, two = load_operations(flow, tmp_path / "one"), load_operations(flow, tmp_path / "two")
    assert one["f"](0) == {"n2": 1} and two["f"](0) == {"n2": 2}
    (tmp_path / "three").mkdir()
    (tmp_path / "three" / "ops.py").write_text("def g(n):\n    return {}\n")
    with pytest.raises(FormatError, match="operation f: cannot load ops:f"):
        load_operations(flow, tmp_path / "three")
    assert load_operations(flow, tmp_path / "three", names=[]) == {}


def test_async_send_is_awaited_and_on_result_sees_every_result() -> None:
    """agent.peers' send is a coroutine (an HTTP POST): the run awaits it before going on."""
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ks, ka = keys.generate(), keys.generate(), keys.generate()
    seen: list[str] = []
    delivered: list[str] = []

    async def send(role: str, blocks: list[Block]) -> None:
        await asyncio.sleep(0.01)
        delivered.append(role)

    sensor = agent(flow, fcid, "sensor", ks, {"aggregator": ka}, authority, send=send,
                   on_result=lambda r: seen.append(r.definition))
    res = asyncio.run(sensor.run())
    assert [r.definition for r in res] == seen == ["readings"] and delivered == ["aggregator"]


def test_an_output_whose_parents_are_not_an_input_set_of_its_operation_is_refused() -> None:
    flow, fcid = flow_and_cid(TWO_DEVICE)
    authority, ks, ka = keys.generate(), keys.generate(), keys.generate()
    aggregator = agent(flow, fcid, "aggregator", ka, {"sensor": ks}, authority, remote_wait=0)
    orphan, block = make_input(value=[100], definition="readings", flow=fcid, parents=[], key=ks,
                               operation="sample", output="readings")  # sample takes a count: where is it?
    aggregator.accept([(orphan, block)], None)
    assert asyncio.run(aggregator.run()) == []
