"""The agent's dataflow core: DFFML semantics, provenance gating, policies and the audit log.

Each refusal the issue lists is produced for real (a forged signature, an unattested
producer, an operation not in the flow or placed elsewhere, a tampered parent, a policy
veto) and must show up, with its reason, in the signed audit log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.attested import AttestedAgents
from agent.audit import MemoryBlocks, verify_log
from agent.orchestrator import FlowContext, Orchestrator, load_operations
from cidboot.dataflow.model import DataFlow, FlowFormatError
from cidboot.dataflow.provenance import (
    ForgedSignature,
    ProvenanceFormatError,
    decode,
    make_input,
    verify_signature,
)
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.trust import keys
from cidboot.trust.appraisal import AFFIRMING, AppraisalResult

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors" / "dffml"


def example(name: str) -> tuple[dict[str, Any], DataFlow, CID]:
    doc = yaml.safe_load((REPO / "examples" / name / "flow.yaml").read_text())
    return doc, DataFlow.from_obj(doc["dataflow"]), CID.of(dagcbor.encode(doc["dataflow"]), DAG_CBOR)


def orchestrator(flow: DataFlow, fcid: CID, ops: dict[str, Callable[..., Any]], *, role: str = "dev",
                 placement: dict[str, list[str]] | None = None, policies: list[dict[str, Any]] | None = None,
                 measurements: dict[str, bytes] | None = None, references: dict[str, bytes] | None = None,
                 **kw: Any) -> Orchestrator:
    ctx = FlowContext(flow, fcid, role, keys.generate(), placement or {}, policies or [], measurements or {},
                      references or {})
    return Orchestrator(ctx, ops, MemoryBlocks(), **kw)


def _record(log: list[Any], value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """An operation body for tests: note what it ran on, return its outputs."""
    log.append(value)
    return out

def test_hello_runs_and_its_policy_passes_on_a_measured_image() -> None:
    doc, flow, fcid = example("hello")
    image = b"\x11" * 64
    o = orchestrator(flow, fcid, load_operations(flow, REPO / "examples/hello"), policies=doc["policies"],
                     measurements={"image": image}, references={"image": image})
    results = asyncio.run(o.run())
    assert [(r.definition, r.value) for r in results] == [("greeting", "hello, world")]
    node = decode(o.store.get(results[0].cid), results[0].cid)
    verify_signature(node)
    (seed,) = node.parents
    assert decode(o.store.get(seed)).value == "world" and node.operation == "hello"
    assert [e.decision for e in o.audit.entries] == ["run", "result"]
    bodies = list(verify_log(o.audit.head, o.store.get, o.ctx.key.public_key()))  # type: ignore[arg-type]
    assert [b["seq"] for b in bodies] == [1, 0]


def test_policy_veto_is_recorded_not_silent() -> None:
    doc, flow, fcid = example("hello")
    o = orchestrator(flow, fcid, load_operations(flow, REPO / "examples/hello"), policies=doc["policies"],
                     measurements={"image": b"\x11" * 64}, references={"image": b"\x22" * 64})
    assert asyncio.run(o.run()) == []
    (veto,) = o.audit.find("veto")
    assert veto.operation == "hello" and "only-measured-images-greet" in veto.reason


def test_two_device_flow_locally() -> None:
    _doc, flow, fcid = example("two-device")
    o = orchestrator(flow, fcid, load_operations(flow, REPO / "examples/two-device"))
    res = {r.definition: r.value for r in asyncio.run(o.run())}
    assert res == {"readings": [(i * 7) % 10 for i in range(5)], "total": sum((i * 7) % 10 for i in range(5))}


def semantics_flow() -> DataFlow:
    return DataFlow.from_obj({
        "definitions": {"n": {"primitive": "int"}, "items": {"primitive": "array"}, "item": {"primitive": "int"},
                        "sq": {"primitive": "int"}, "ok": {"primitive": "bool"}, "total": {"primitive": "int"},
                        "shared": {"primitive": "str", "lock": True}, "tag": {"primitive": "str"}},
        "operations": {
            "count": {"implementation": "m:count", "inputs": {"n": "n"}, "outputs": {"item": "item"},
                      "expand": ["item"]},
            "square": {"implementation": "m:square", "inputs": {"x": "item"}, "outputs": {"sq": "sq"},
                       "conditions": ["ok"]},
            "use_a": {"implementation": "m:use", "inputs": {"s": "shared"}, "outputs": {"tag": "tag"}},
            "use_b": {"implementation": "m:use", "inputs": {"s": "shared"}, "outputs": {"tag": "tag"}},
            "tidy": {"implementation": "m:tidy", "inputs": {"x": "sq"}, "outputs": {}, "stage": "cleanup"},
            "report": {"implementation": "m:report", "inputs": {"x": "sq"}, "outputs": {"total": "total"},
                       "stage": "output"}},
        "seed": [{"definition": "n", "value": 3}, {"definition": "ok", "value": True},
                 {"definition": "shared", "value": "res"}]})


def test_dffml_semantics_expand_conditions_stages_unique_sets_and_locks() -> None:
    flow = semantics_flow()
    order: list[str] = []
    active: list[str] = []
    overlaps: list[int] = []

    def count(n: int) -> dict[str, Any]:
        order.append("count")
        return {"item": list(range(n))}

    def square(x: int) -> dict[str, Any]:
        order.append("square")
        return {"sq": x * x}

    async def use(s: str) -> dict[str, Any]:
        active.append(s)
        overlaps.append(len(active))
        await asyncio.sleep(0.01)
        active.remove(s)
        return {"tag": s}

    def tidy(x: int) -> dict[str, Any]:
        order.append("tidy")
        return {}

    def report(x: int) -> dict[str, Any]:
        order.append("report")
        return {"total": x}

    o = orchestrator(flow, flow.cid, {"count": count, "square": square, "use_a": use, "use_b": use, "tidy": tidy,
                                      "report": report})
    res = asyncio.run(o.run())
    assert sorted(r.value for r in res if r.definition == "sq") == [0, 1, 4]  # expand: one input per item
    assert order.index("tidy") > max(i for i, x in enumerate(order) if x == "square")  # cleanup after processing
    assert order.index("report") > max(i for i, x in enumerate(order) if x == "tidy")  # output last
    assert order.count("square") == 3 and order.count("report") == 3  # each unique input set once
    assert overlaps == [1, 1]  # the locked definition is used by one operation at a time


def test_condition_false_means_no_run() -> None:
    flow = semantics_flow()
    flow.seed = [s if s.definition != "ok" else type(s)("ok", False) for s in flow.seed]
    ran: list[int] = []
    ops = {"count": lambda n: {"item": [1]}, "square": lambda x: _record(ran, x, {"sq": x}), "use_a": lambda s: {},
           "use_b": lambda s: {}, "tidy": lambda x: {}, "report": lambda x: {"total": x}}
    asyncio.run(orchestrator(flow, flow.cid, ops).run())
    assert ran == []


def test_dffml_export_loads() -> None:
    # tests/vectors/dffml/shouldi.json is DFFML 0.4's own DataFlow.export(linked=True) (the
    # `dffml dataflow create` output), written by tests/vectors/dffml/generate.py
    flow = DataFlow.from_dffml(json.loads((VECTORS / "shouldi.json").read_text()))
    assert set(flow.operations) == {"pypi_latest_package_version", "pypi_package_json", "safety_check"}
    assert flow.allows("safety_check", "version", ("pypi_latest_package_version", "version"))
    assert not flow.allows("safety_check", "version", "seed")
    assert flow.operations["safety_check"].stage == "processing"
    with pytest.raises(FlowFormatError, match=r"operations.safety_check.stage: must be one of"):
        doc = json.loads((VECTORS / "shouldi.json").read_text())
        doc["operations"]["safety_check"]["stage"] = "later"
        DataFlow.from_dffml(doc)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["operations"]["hello"].__setitem__("inputs", {"name": "nme"}), "undefined definition 'nme'"),
    (lambda d: d["operations"]["hello"].__setitem__("implementation", "ops.hello"), "must be module:function"),
    (lambda d: d.__setitem__("flow", {"hello": {"inputs": {"name": [{"nope": "x"}]}}}), "nope.x is not an output"),
    (lambda d: d.__setitem__("seed", "world"), "dataflow.seed: must be a list"),
    (lambda d: d.__setitem__("extra", 1), r"unknown keys \['extra'\]"),
])
def test_malformed_flows_are_refused_precisely(mutate: Callable[[dict[str, Any]], None], match: str) -> None:
    doc, _flow, _cid = example("hello")
    d = doc["dataflow"]
    mutate(d)
    with pytest.raises(FlowFormatError, match=match):
        DataFlow.from_obj(d)


# -- refusals -------------------------------------------------------------------------------------

def two_device_aggregator(attested: AttestedAgents | None = None) -> tuple[Orchestrator, DataFlow, CID]:
    doc, flow, fcid = example("two-device")
    o = orchestrator(flow, fcid, load_operations(flow, REPO / "examples/two-device"), role="aggregator",
                     placement=doc["placement"], attested=attested, remote_wait=0.2)
    return o, flow, fcid


def affirmed(key: Any, role: str) -> AppraisalResult:
    res = AppraisalResult(role=role, leaf_public_key=key.public_key())
    res.add("test", AFFIRMING, "attested in this test")
    return res


def sensor_output(fcid: CID, key: Any, *, readings: list[int] | None = None, operation: str = "sample",
                  seed_value: int = 5) -> tuple[list[tuple[CID, bytes]], CID]:
    seed_cid, seed = make_input(value=seed_value, definition="count", flow=fcid, parents=[fcid], key=key)
    cid, block = make_input(value=readings if readings is not None else [0, 7, 4, 1, 8], definition="readings",
                            flow=fcid, parents=[seed_cid], key=key, operation=operation, output="readings")
    return [(seed_cid, seed), (cid, block)], cid


def run_with(o: Orchestrator, blocks: list[tuple[CID, bytes]], sender: AppraisalResult | None) -> list[Any]:
    o.accept(blocks, sender)
    return [(r.definition, r.value) for r in asyncio.run(o.run())]


def test_attested_sensor_inputs_run_on_the_aggregator() -> None:
    sensor = keys.generate()
    attested = AttestedAgents()
    attested.add(affirmed(sensor, "sensor"))
    o, _flow, fcid = two_device_aggregator(attested)
    blocks, _ = sensor_output(fcid, sensor)
    assert run_with(o, blocks, None) == [("total", 20)]
    assert len(o.audit.find("accepted")) == 1


def test_input_from_an_unattested_agent_is_refused() -> None:
    o, _flow, fcid = two_device_aggregator()
    blocks, cid = sensor_output(fcid, keys.generate())
    assert run_with(o, blocks, None) == []
    (r,) = o.audit.find("refused")
    assert r.inputs == [cid] and "UnattestedProducer" in r.reason


def test_forged_signature_is_refused() -> None:
    sensor, forger = keys.generate(), keys.generate()
    attested = AttestedAgents()
    attested.add(affirmed(sensor, "sensor"))
    o, _flow, fcid = two_device_aggregator(attested)
    blocks, _ = sensor_output(fcid, sensor)
    # the forger re-signs the node with its own key but keeps the sensor as producer
    doc = dagcbor.decode(blocks[1][1])
    from cidboot.trust import cose

    doc["sig"] = cose.sign1(dagcbor.encode(doc["input"]), forger, tagged=False, detached=True)
    forged = dagcbor.encode(doc)
    fcid2 = CID.of(forged, DAG_CBOR)
    with pytest.raises(ForgedSignature):
        verify_signature(decode(forged))
    assert run_with(o, [blocks[0], (fcid2, forged)], None) == []
    assert any("ForgedSignature" in e.reason for e in o.audit.find("refused"))


def test_output_of_an_operation_not_in_the_flow_or_on_another_role_is_refused() -> None:
    sensor = keys.generate()
    attested = AttestedAgents()
    attested.add(affirmed(sensor, "sensor"))
    o, _flow, fcid = two_device_aggregator(attested)
    blocks, _ = sensor_output(fcid, sensor, operation="exfiltrate")
    assert run_with(o, blocks, None) == []
    assert any("not in the flow" in e.reason for e in o.audit.find("refused"))
    # a genuine operation, but its producer was attested as an aggregator, not a sensor
    rogue = keys.generate()
    attested.add(affirmed(rogue, "aggregator"))
    o2, _f, fcid = two_device_aggregator(attested)
    blocks, _ = sensor_output(fcid, rogue)
    assert run_with(o2, blocks, None) == []
    assert any("not placed on role 'aggregator'" in e.reason for e in o2.audit.find("refused"))


def test_tampered_parent_is_refused() -> None:
    sensor = keys.generate()
    attested = AttestedAgents()
    attested.add(affirmed(sensor, "sensor"))
    o, _flow, fcid = two_device_aggregator(attested)
    blocks, cid = sensor_output(fcid, sensor)
    seed_cid, seed = blocks[0]
    tampered = seed.replace(b"\x05", b"\x06", 1)  # count 5 -> 6, bytes no longer hash to the link
    o.store.blocks[seed_cid] = tampered  # type: ignore[attr-defined]
    assert run_with(o, [blocks[1]], None) == []
    (r,) = o.audit.find("refused")
    assert "TamperedParent" in r.reason and str(seed_cid) in r.reason


def test_a_seed_the_flow_does_not_declare_is_refused() -> None:
    sensor = keys.generate()
    attested = AttestedAgents()
    attested.add(affirmed(sensor, "sensor"))
    o, _flow, fcid = two_device_aggregator(attested)
    blocks, _ = sensor_output(fcid, sensor, seed_value=500)
    assert run_with(o, blocks, None) == []
    assert any("seed count=500 is not in the flow" in e.reason for e in o.audit.find("refused"))


@pytest.mark.parametrize("block, match", [
    (b"\xa0", "exactly 'input' and 'sig'"),
    (dagcbor.encode({"input": {"value": 1}, "sig": b""}), r"input: missing \['definition', 'flow'"),
    (b"\xff\xff", "provenance node"),
])
def test_malformed_nodes_are_refused_precisely(block: bytes, match: str) -> None:
    with pytest.raises(ProvenanceFormatError, match=match):
        decode(block)


def test_validation_can_be_switched_off_for_the_benchmark() -> None:
    o, _flow, fcid = two_device_aggregator()
    o.validate_inputs = False
    blocks, _ = sensor_output(fcid, keys.generate())
    assert run_with(o, blocks, None) == [("total", 20)]


def test_definitions_are_locked_to_parameters() -> None:
    """An input claiming another definition than its origin outputs is refused, and one whose
    definition no parameter takes is never used."""
    _doc, flow, fcid = example("two-device")
    key = keys.generate()
    attested = AttestedAgents()
    attested.add(affirmed(key, "sensor"))
    ran: list[Any] = []
    o = orchestrator(flow, fcid, {"sample": lambda count: _record(ran, count, {"readings": []}),
                                  "summarise": lambda readings: _record(ran, readings, {"total": 0})},
                     attested=attested)
    o.ctx.flow.seed = []  # only the forged inputs below
    seed_cid, seed = make_input(value=5, definition="count", flow=fcid, parents=[fcid], key=key)
    wrong, block = make_input(value=3, definition="count", flow=fcid, parents=[seed_cid], key=key,
                              operation="sample", output="readings")  # sample.readings is a `readings`
    o.accept([(seed_cid, seed), (wrong, block)], None)
    assert any(e.inputs == [wrong] and "UnknownOperation" in e.reason and "has no output 'readings' of count"
               in e.reason for e in o.audit.find("refused"))
    assert wrong not in o.network


def test_operation_failures_are_recorded_and_the_flow_goes_on() -> None:
    flow = DataFlow.from_obj({
        "definitions": {"n": {"primitive": "int"}, "x": {"primitive": "any"}, "items": {"primitive": "int"}},
        "operations": {"boom": {"implementation": "m:boom", "inputs": {"n": "n"}, "outputs": {"x": "x"}},
                       "nan": {"implementation": "m:nan", "inputs": {"n": "n"}, "outputs": {"x": "x"}},
                       "wrong": {"implementation": "m:wrong", "inputs": {"n": "n"}, "outputs": {"x": "x"}},
                       "notlist": {"implementation": "m:notlist", "inputs": {"n": "n"},
                                   "outputs": {"items": "items"}, "expand": ["items"]},
                       "fine": {"implementation": "m:fine", "inputs": {"n": "n"}, "outputs": {"x": "x"}}},
        "seed": [{"definition": "n", "value": 1}]})

    def boom(n: int) -> dict[str, Any]:
        raise RuntimeError("sensor unplugged")

    ops = {"boom": boom, "nan": lambda n: {"x": float("nan")}, "wrong": lambda n: {"y": 1},
           "notlist": lambda n: {"items": 7}, "fine": lambda n: {"x": {"ok": [n]}}}
    o = orchestrator(flow, flow.cid, ops)
    assert [(r.definition, r.value) for r in asyncio.run(o.run())] == [("x", {"ok": [1]})]
    reasons = {e.operation: e.reason for e in o.audit.find("error")}
    assert reasons["boom"].startswith("boom raised RuntimeError: sensor unplugged (at test_agent_flow.py:")
    assert "nan.x: x value nan: not DAG-CBOR data: NaN and Infinity are not allowed" in reasons["nan"]
    assert "wrong returned dict without its outputs ['x']" in reasons["wrong"]
    assert reasons["notlist"] == "notlist.items is expanded but returned int, not a list"
    assert o.audit.find("refused") == []  # an operation's failure is not a security refusal


def test_operation_that_raises_is_reported_as_error_not_refused_with_traceback_under_verbose(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16 #4: an exception in an operation is `error:` in the audit log (not `refused:`, the
    word for security refusals), names where it raised, and the traceback is logged at INFO (-v)."""
    import logging

    flow = DataFlow.from_obj({
        "definitions": {"n": {"primitive": "int"}, "x": {"primitive": "any"}},
        "operations": {"boom": {"implementation": "m:boom", "inputs": {"n": "n"}, "outputs": {"x": "x"}}},
        "seed": [{"definition": "n", "value": 1}]})

    def boom(n: int) -> dict[str, Any]:
        return {"x": 1 // (n - 1)}

    o = orchestrator(flow, flow.cid, {"boom": boom})
    caplog.set_level(logging.INFO, logger="agent.orchestrator")
    assert asyncio.run(o.run()) == []
    (e,) = o.audit.find("error")
    assert e.operation == "boom" and "ZeroDivisionError" in e.reason and "in boom" in e.reason
    assert o.audit.find("refused") == []
    (rec,) = [r for r in caplog.records if r.name == "agent.orchestrator"]
    assert rec.levelno == logging.INFO and rec.exc_info is not None and rec.exc_info[0] is ZeroDivisionError
