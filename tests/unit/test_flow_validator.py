"""One flow, read one way (fail-closed #3): the attacks on the builder/agent disagreement.

Each test is an attack that worked on main: a flow the builder signed that the agent reads
another way (or not at all), a policy the builder refused as documented or accepted and the
agent never enforced, keys and values one side accepted and the other refused. Every tool
now calls cidboot.dataflow.checks, so each is refused everywhere with the same message.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.audit import MemoryBlocks
from agent.cli import main as agent_main
from agent.orchestrator import FlowContext, Orchestrator
from agent.policy import RunContext, veto_reason
from cidboot.dataflow.model import DataFlow
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.ipld.unixfs.importer import import_bytes
from cidboot.store.blockstore import Blockstore
from cidboot.trust import keys
from cidboot.trust.cose_key import encode_public_key_bytes
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from imagebuilder import flowfile
from imagebuilder.flowfile import FlowFileError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# b lists only `r` under `flow:` and takes `q` from a by auto-flow; a takes `p` from b:
# a -> b -> a for the agent, which then runs nothing; main's builder saw only b -> a and signed it.
AUTO_FLOW_CYCLE = """\
name: autocycle
version: 1
image:
  kernel: {path: bzImage}
dataflow:
  definitions:
    p: {primitive: int}
    q: {primitive: int}
    r: {primitive: int}
  operations:
    a:
      implementation: ops:a
      inputs: {p: p}
      outputs: {q: q}
    b:
      implementation: ops:b
      inputs: {r: r, q: q}
      outputs: {p: p}
  seed:
    - {definition: r, value: 1}
  flow:
    a: {inputs: {p: [{b: p}]}}
    b: {inputs: {r: [seed]}}
placement:
  device: [a, b]
trust:
  keys: [keys/signer-1.pem]
  threshold: 1
  expires: "2030-01-01"
"""
AUTO_FLOW_OPS = "def a(p):\n    return {'q': p}\n\n\ndef b(r, q):\n    return {'p': r + q}\n"
CYCLE_MESSAGE = "dataflow.operations.a: cycle: a -> b -> a"


def _copy(name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    shutil.copytree(EXAMPLES / name, d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    for k in yaml.safe_load((d / "flow.yaml").read_text())["trust"]["keys"]:
        keys.write_keypair(keys.generate(), (d / k).with_suffix(""))
    return d / "flow.yaml"


def _edit(flow: Path, old: str, new: str) -> Path:
    text = flow.read_text()
    assert old in text, old
    flow.write_text(text.replace(old, new, 1))
    return flow


def _problems(flow: Path) -> list[str]:
    with pytest.raises(FlowFileError) as exc:
        flowfile.load(flow, require_keys=False)  # what `imagebuilder lock` calls before resolving anything
    return [p.replace(f"{flow}:", "F:") for p in exc.value.problems]


def _agent_run(flow: Path | CID, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = agent_main(["run", str(flow), "--identity", str(tmp_path / "id"), "--store", str(tmp_path / "store"), "--json"])
    return rc, capsys.readouterr().err


def _auto_flow_cycle(tmp_path: Path) -> Path:
    d = tmp_path / "autocycle"
    (d / "keys").mkdir(parents=True)
    keys.write_keypair(keys.generate(), d / "keys/signer-1")
    (d / "bzImage").write_bytes(b"not a kernel")
    (d / "ops.py").write_text(AUTO_FLOW_OPS)
    (d / "flow.yaml").write_text(AUTO_FLOW_CYCLE)
    return d / "flow.yaml"


def _signed(store: Blockstore, doc: dict[str, Any], ops_source: bytes) -> CID:
    """What main's builder produced from such a flow: a manifest signing it (built by hand here)."""
    flow_cid = store.put_block(dagcbor.encode(doc["dataflow"]), DAG_CBOR)
    code = import_bytes(ops_source, store).cid
    signer = keys.generate()
    root = RootOfTrust((encode_public_key_bytes(signer.public_key()),), 1)
    layer = import_bytes(b"an image layer", store)
    m = Manifest(doc["name"], 1, int(time.time()) + 3600, (Layer(layer.cid, layer.size, "agent"),), root, {},
                 flow=flow_cid, operations={op: code for op in doc["dataflow"]["operations"]},
                 placement=doc.get("placement") or {}, policies=doc.get("policies") or [])
    signed = sign_manifest(m, [signer])
    store.put(signed.cid, signed.encode())
    return signed.cid


def test_cycle_only_through_auto_flow_is_refused_by_lock_build_inspect_and_agent_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = _auto_flow_cycle(tmp_path)
    line = f"{flow}:11:5: {CYCLE_MESSAGE}"
    # lock (its validation), build (the CLI, before any lock or download), agent run: the same line
    assert _problems(flow) == [f"F:11:5: {CYCLE_MESSAGE}"]
    build = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(flow), "--store", str(tmp_path / "s")],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert build.returncode == 1 and line in build.stderr, build.stderr
    assert not (tmp_path / "s").exists()
    rc, err = _agent_run(flow, tmp_path, capsys)
    assert rc == 1 and line in err
    # a manifest that signed it anyway (main's builder did): inspect and agent run refuse it
    store = Blockstore(tmp_path / "store")
    mcid = _signed(store, yaml.safe_load(AUTO_FLOW_CYCLE), AUTO_FLOW_OPS.encode())
    shown = subprocess.run([sys.executable, "-m", "imagebuilder", "inspect", str(mcid), "--store", str(tmp_path / "store")],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert shown.returncode == 1 and f"manifest {mcid}: {CYCLE_MESSAGE}" in shown.stderr, shown.stderr
    rc, err = _agent_run(mcid, tmp_path, capsys)
    assert rc == 1 and f"manifest {mcid}: {CYCLE_MESSAGE}" in err


def test_auto_flow_edges_are_the_agents_edges() -> None:
    from cidboot.dataflow import checks

    model = DataFlow.from_obj(yaml.safe_load(AUTO_FLOW_CYCLE)["dataflow"])
    assert checks.operation_edges(model) == {"a": {"b"}, "b": {"a"}}
    assert checks.find_cycle(checks.operation_edges(model)) == ["a", "b", "a"]


def test_seed_producer_as_documented_is_accepted_by_lock(tmp_path: Path) -> None:
    flow = _copy("hello", tmp_path)
    _edit(flow, "    veto: {operation: hello}", "    veto: {operation: hello, producer: seed}")
    assert flowfile.load(flow, require_keys=False).data["policies"][0]["veto"]["producer"] == "seed"
    _edit(flow, "producer: seed}", "producer: device}")  # a role of the placement
    flowfile.load(flow, require_keys=False)


def test_operation_name_as_producer_is_refused_by_lock_and_vetoes_everything_on_the_agent(tmp_path: Path) -> None:
    flow = _copy("hello", tmp_path)
    _edit(flow, "    veto: {operation: hello}", "    veto: {producer: hello}")
    assert _problems(flow) == ["F:36:22: policies.0.veto.producer: producer 'hello' is neither \"seed\" nor "
                               "a role of the placement ['device']"]
    # a manifest carrying it anyway: the agent enforces the same rule, so it vetoes every run
    doc = yaml.safe_load(flow.read_text())
    model = DataFlow.from_obj(doc["dataflow"])
    ctx = FlowContext(model, model.cid, "device", keys.generate(), doc["placement"], doc["policies"])
    o = Orchestrator(ctx, {"hello": lambda name: {"greeting": f"hello, {name}"}}, MemoryBlocks())
    assert asyncio.run(o.run()) == []
    (veto,) = o.audit.find("veto")
    assert "malformed, so it vetoes everything" in veto.reason and "neither \"seed\" nor a role" in veto.reason
    from agent.policy import PolicyScope  # (imported here so this file runs against main too)

    scope = PolicyScope.of(model, doc["placement"])
    assert veto_reason(doc["policies"], RunContext("hello", ["name"], ["device"], {}, {}, scope)) is not None


def test_unknown_keys_and_primitives_are_refused_by_agent_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = _copy("hello", tmp_path)
    _edit(flow, "policies:", "polices:")  # a misspelt section drops every policy if it is ignored
    rc, err = _agent_run(flow, tmp_path, capsys)
    assert rc == 1 and f"{flow}:34:1: polices: unknown key" in err
    _edit(flow, "polices:", "policies:")
    _edit(flow, "    name: {primitive: str}", "    name: {primitive: string}")
    rc, err = _agent_run(flow, tmp_path, capsys)
    assert rc == 1 and f"{flow}:22:23: dataflow.definitions.name.primitive: 'string' is not one of" in err


def test_seed_of_the_wrong_primitive_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = _copy("two-device", tmp_path)
    _edit(flow, "    - {definition: count, value: 5}", "    - {definition: count, value: five}")
    line = "F:33:34: dataflow.seed.0.value: 'five' (str) is not a int (definition 'count')"
    assert _problems(flow) == [line]
    rc, err = _agent_run(flow, tmp_path, capsys)
    assert rc == 1 and line.replace("F:", f"{flow}:") in err


def test_input_name_that_is_not_a_parameter_of_the_function_is_refused(tmp_path: Path) -> None:
    flow = _copy("hello", tmp_path)
    _edit(flow, "      inputs: {name: name}", "      inputs: {nam: name}")
    assert _problems(flow) == [
        "F:27:7: dataflow.operations.hello.inputs: ops:hello requires parameter 'name', which no input of hello feeds",
        "F:27:16: dataflow.operations.hello.inputs.nam: ops:hello has no parameter 'nam' (it takes ['name'])"]


def test_operation_placed_on_no_role_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = _copy("two-device", tmp_path)
    _edit(flow, "  aggregator: [summarise]\n", "")
    line = ("F:27:5: dataflow.operations.summarise: operation 'summarise' is placed on no role "
            "(placement has ['sensor']): it would never run")
    assert _problems(flow) == [line]
    rc, err = _agent_run(flow, tmp_path, capsys)
    assert rc == 1 and line.replace("F:", f"{flow}:") in err


def test_output_of_the_wrong_primitive_is_refused_at_run_time() -> None:
    doc = yaml.safe_load((EXAMPLES / "two-device/flow.yaml").read_text())
    model = DataFlow.from_obj(doc["dataflow"])
    ctx = FlowContext(model, model.cid, "dev", keys.generate())
    ops = {"sample": lambda count: {"readings": [1, 2]}, "summarise": lambda readings: {"total": "three"}}
    o = Orchestrator(ctx, ops, MemoryBlocks())
    assert [(r.definition, r.value) for r in asyncio.run(o.run())] == [("readings", [1, 2])]
    (refused,) = o.audit.find("refused")
    assert refused.operation == "summarise"
    assert refused.reason == "summarise.total: 'three' (str) is not a int (definition 'total')"


def test_examples_validate_everywhere(tmp_path: Path) -> None:
    from cidboot.dataflow import checks

    for name in ("hello", "two-device"):
        flow = _copy(name, tmp_path)
        ff = flowfile.load(flow)
        model, problems = checks.check(ff.data, modules=checks.modules_beside(flow.parent), file_keys=True)
        assert problems == [] and model is not None


def test_inspect_shows_a_valid_signed_flow_with_the_agents_edges(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "two-device/flow.yaml").read_text())
    store = Blockstore(tmp_path / "store")
    mcid = _signed(store, doc, (EXAMPLES / "two-device/ops.py").read_bytes())
    shown = subprocess.run([sys.executable, "-m", "imagebuilder", "inspect", str(mcid), "--store", str(tmp_path / "store"),
                            "--no-files"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "  sample -> summarise" in shown.stdout
