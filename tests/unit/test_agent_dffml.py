"""DFFML compatibility: exports written by DFFML itself load, and the orchestrator makes the
same operation calls as DFFML's MemoryOrchestrator on the same flow.

The vectors in tests/vectors/dffml/ were written by DFFML 0.4.0.post2 (`DataFlow.export`, the
`dffml dataflow create` output, linked and `-not-linked`) and its MemoryOrchestrator's call log,
by tests/vectors/dffml/generate.py under Python 3.8 (DFFML does not import on 3.11)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from agent.audit import MemoryBlocks
from agent.orchestrator import FlowContext, Orchestrator
from cidboot.dataflow.model import SEED, DataFlow, FlowFormatError
from cidboot.trust import keys

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dffml"


def vector(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def test_linked_and_unlinked_exports_give_the_same_model() -> None:
    linked = DataFlow.from_dffml(vector("shouldi.json"))
    unlinked = DataFlow.from_dffml(vector("shouldi-unlinked.json"))
    assert linked.definitions == unlinked.definitions and linked.operations == unlinked.operations
    assert linked.connections == unlinked.connections and linked.seed == unlinked.seed
    assert linked.operations["safety_check"].implementation == "ops:safety_check"
    assert linked.allows("safety_check", "package", SEED)  # {"seed": ["package"]}
    assert linked.allows("safety_check", "version", ("pypi_latest_package_version", "version"))
    assert not linked.allows("safety_check", "version", SEED)
    assert DataFlow.from_dffml(vector("shouldi.json"), module="shouldi").operations["safety_check"].implementation \
        == "shouldi:safety_check"


def test_same_calls_as_dffml_memory_orchestrator() -> None:
    flow = DataFlow.from_dffml(vector("semantics.json"))
    assert flow.definitions["shared"].lock and flow.operations["count"].expand == ("item",)
    assert flow.operations["report"].stage == "output" and flow.operations["square"].conditions == ("ok",)
    calls: list[list[Any]] = []

    def count(n: int) -> dict[str, Any]:
        calls.append(["count", {"n": n}])
        return {"item": list(range(n))}

    async def square(x: int, s: str) -> dict[str, Any]:
        calls.append(["square", {"s": s, "x": x}])
        return {"sq": x * x}

    def report(x: int) -> dict[str, Any]:
        calls.append(["report", {"x": x}])
        return {"total": x}

    o = Orchestrator(FlowContext(flow, flow.cid, "dev", keys.generate()),
                     {"count": count, "square": square, "report": report}, MemoryBlocks())
    asyncio.run(o.run())
    assert sorted(calls, key=lambda c: json.dumps(c, sort_keys=True)) == vector("semantics.calls.json")


def _broken(name: str, change: Any) -> Any:
    doc = copy.deepcopy(vector(name))
    change(doc)
    return doc


@pytest.mark.parametrize("doc, match", [
    (_broken("shouldi.json", lambda d: d.__setitem__("extra", 1)), r"DFFML dataflow: unknown keys \['extra'\]"),
    (_broken("shouldi.json", lambda d: d["operations"]["safety_check"]["inputs"].__setitem__("version", "nope")),
     r"operations.safety_check.inputs.version: undefined definition 'nope'"),
    (_broken("shouldi.json", lambda d: d["operations"]["safety_check"].__setitem__("stage", "later")),
     r"operations.safety_check.stage: must be one of"),
    (_broken("shouldi.json", lambda d: d["seed"][0].__setitem__("origin", "pypi_package_json")),
     r"seed\[0\].origin: a seed's origin is \"seed\""),
    (_broken("shouldi.json", lambda d: d["seed"][0].pop("value")), r"seed\[0\]: missing value"),
    (_broken("shouldi.json", lambda d: d["definitions"]["package"].__setitem__("name", "pkg")),
     r"definitions.package.name: 'pkg' under the key 'package'"),
    (_broken("shouldi.json", lambda d: d["flow"]["safety_check"]["inputs"].__setitem__(
        "package", [{"seed": ["package_version"]}])),
     r"alternate definitions \['package_version'\] differ from the parameter's 'package'"),
    (_broken("shouldi.json", lambda d: d["flow"]["safety_check"]["inputs"].__setitem__(
        "version", [{"pypi_package_json": "response_json"}])),
     r"pypi_package_json.response_json is a package_json, not a package_version"),
    (_broken("shouldi-unlinked.json", lambda d: d["operations"]["safety_check"]["inputs"]["package"].__setitem__(
        "primitive", "int")), r"definition 'package' conflicts with an earlier one"),
    (_broken("semantics.json", lambda d: d["flow"]["square"].__setitem__("conditions", [{"count": "item"}])),
     r"flow.square.conditions\[0\]: count.item feeds none of square's conditions \['ok'\]"),
    ([], "DFFML dataflow: must be a map"),
])
def test_malformed_exports_are_refused_precisely(doc: Any, match: str) -> None:
    with pytest.raises(FlowFormatError, match=match):
        DataFlow.from_dffml(doc)


def test_auto_flow_is_dffmls_producers_else_seed() -> None:
    doc = {"definitions": {"a": {"primitive": "int"}, "b": {"primitive": "int"}},
           "operations": {"f": {"implementation": "m:f", "inputs": {"x": "a"}, "outputs": {"y": "b"}},
                          "g": {"implementation": "m:g", "inputs": {"x": "b"}, "outputs": {}}},
           "seed": [{"definition": "a", "value": 1}, {"definition": "b", "value": 2}]}
    flow = DataFlow.from_obj(doc)
    assert flow.connections == {"f": {"x": [SEED]}, "g": {"x": [("f", "y")]}}  # the seeded b never feeds g
