"""Private results (issue 18 #4): values sealed to the flow owner's age recipients.

The sealed value is its own block; the provenance node links it, so node CIDs and signatures
still chain and a third party validates without the key; only the owner's identity opens it;
peers of a two-device flow get an opening (the file key) beside the sealed block."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.attested import AttestedAgents
from agent.audit import MemoryBlocks
from agent.orchestrator import Block, FlowContext, Orchestrator, load_operations
from agent.validate import SealedValueUnknown, TamperedInput, TamperedParent, Validator
from cidboot.dataflow import checks
from cidboot.dataflow.model import DataFlow
from cidboot.dataflow.provenance import decode, make_input, verify_signature
from cidboot.dataflow.sealing import (
    Owner,
    OwnerFormatError,
    SealedValueError,
    decode_opening,
    decode_sealed,
    make_opening,
    open_value,
    open_with_opening,
    seal_value,
)
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.trust import keys
from cidboot.trust.appraisal import AFFIRMING, AppraisalResult
from cidboot.trust.manifest import Manifest, ManifestFormatError, RootOfTrust
from cidboot.trust.private.sealed import HeaderMacError, Identity, NoMatchingIdentity, load_identities
from imagebuilder import flowfile
from imagebuilder.cli import main as ib_main
from tests.unit.test_agent_flow import REPO, example

MARKER = "private-marker-7f3a"


def owner_of(*idents: Identity, seal: str = "results") -> Owner:
    return Owner(tuple(i.recipient for i in idents), seal)


# -- the sealed value -----------------------------------------------------------------------------

def test_seal_open_round_trip_and_wrong_identity() -> None:
    alice, bob, eve = Identity.generate(), Identity.generate(), Identity.generate()
    value = {"greeting": MARKER, "n": [1, 2, 3], "raw": b"\x00\xff"}
    cid, block, file_key = seal_value(value, owner_of(alice, bob).raw)
    assert MARKER.encode() not in block
    sv = decode_sealed(block, cid)
    assert sv.recipients == 2
    assert open_value(block, [alice], cid) == value and open_value(block, [bob], cid) == value
    assert open_with_opening(block, file_key, cid) == value  # what a peer gets, without the owner's key
    with pytest.raises(NoMatchingIdentity):
        open_value(block, [eve], cid)
    _c2, block2, key2 = seal_value(value, owner_of(alice).raw)
    with pytest.raises(HeaderMacError):  # another file's key opens nothing here
        open_with_opening(block, key2, cid)
    assert block2 != block  # sealing is randomised: equal values do not give equal CIDs


def test_tampered_sealed_block_fails_by_cid() -> None:
    alice = Identity.generate()
    cid, block, _ = seal_value("x", owner_of(alice).raw)
    bad = bytearray(block)
    bad[-3] ^= 1
    from cidboot.errors import VerificationError

    with pytest.raises(VerificationError):
        decode_sealed(bytes(bad), cid)
    with pytest.raises(SealedValueError):
        decode_sealed(dagcbor.encode({"format": "age-v2", "sealed": b""}))


def test_opening_blocks_are_strict() -> None:
    ocid, oblock = make_opening(CID.parse("bafyreigf6b6wctsylw4locgqezzfk3qps26qpiujiejafipddymtl5qfyi"), bytes(16))
    assert decode_opening(oblock, ocid) is not None
    assert decode_opening(dagcbor.encode({"input": 1})) is None  # another kind of block
    with pytest.raises(SealedValueError):
        decode_opening(dagcbor.encode({"opening": {"sealed": 1, "file_key": bytes(16)}}))


def test_identity_file_and_keygen_owner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "owner.key"
    assert ib_main(["keygen", "--owner", str(path)]) == 0
    recipient = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (ident,) = load_identities(path.read_text())  # comments skipped, as age-keygen writes them
    assert ident.recipient == recipient and Owner((recipient,)).raw
    before = path.read_bytes()
    assert ib_main(["keygen", "--owner", str(path)]) == 1  # never overwritten
    assert "not overwriting" in capsys.readouterr().err and path.read_bytes() == before


# -- the owner in the flow and the manifest -------------------------------------------------------

def test_flow_validator_rejects_bad_recipients() -> None:
    good = Identity.generate().recipient
    doc, _flow, _fcid = example("hello")
    bad_checksum = good[:-1] + ("q" if good[-1] != "q" else "p")
    secret = str(Identity.generate())  # an identity where a recipient belongs: a classic mistake
    for owner, code in [({"recipients": [bad_checksum]}, "owner"), ({"recipients": [secret]}, "owner"),
                        ({"recipients": []}, "owner"), ({"recipients": [good], "seal": "some"}, "owner"),
                        ({"recipients": [good, good]}, "owner"), ({"recipient": [good]}, "unknown-key")]:
        _m, problems = checks.check({**doc, "owner": owner}, modules=checks.modules_beside(REPO / "examples/hello"),
                                    file_keys=True)
        assert code in [p.code for p in problems], (owner, problems)
        assert all(p.path[0] == "owner" for p in problems), problems
    _m, problems = checks.check({**doc, "owner": {"recipients": [good], "seal": "all"}},
                                modules=checks.modules_beside(REPO / "examples/hello"), file_keys=True)
    assert problems == []
    with pytest.raises(OwnerFormatError):
        Owner((bad_checksum,))


def test_flow_file_names_the_bad_recipient_line(tmp_path: Path) -> None:
    src = (REPO / "examples/hello/flow.yaml").read_text()
    good = Identity.generate().recipient
    bad = good[:-1] + ("q" if good[-1] != "q" else "p")
    flow = tmp_path / "flow.yaml"
    flow.write_text(src.replace("version: 1\n", f"version: 1\nowner:\n  recipients: [{bad}]\n", 1))
    (tmp_path / "ops.py").write_text((REPO / "examples/hello/ops.py").read_text())
    (tmp_path / "greeting.txt").write_text("hi\n")
    with pytest.raises(flowfile.FlowFileError) as e:
        flowfile.load(flow, require_keys=False)
    line = flow.read_text().splitlines().index(f"  recipients: [{bad}]") + 1
    assert any(f":{line}:16:" in p and "owner.recipients.0" in p and "checksum" in p for p in e.value.problems), \
        e.value.problems
    flow.write_text(src.replace("version: 1\n", f"version: 1\nowner:\n  recipients: [{good}]\n", 1))
    assert flowfile.load(flow, require_keys=False).data["owner"]["recipients"] == [good]


def test_manifest_carries_the_owner_signed_and_strict() -> None:
    root = RootOfTrust.from_public_keys([keys.generate().public_key()], 1)
    base = Manifest(name="m", version=1, expires=2**31, layers=(), root=root)
    assert "owner" not in base.to_obj()  # manifests without an owner keep their bytes
    owner = owner_of(Identity.generate(), seal="all")
    m = Manifest(name="m", version=1, expires=2**31, layers=(), root=root, owner=owner.to_obj())
    again = Manifest.from_obj(dagcbor.decode(m.encode()))
    assert again.sealing_owner == owner and again.encode() == m.encode()
    with pytest.raises(ManifestFormatError):
        Manifest(name="m", version=1, expires=2**31, layers=(), root=root, owner={"recipients": ["age1nope"]})


def test_a_swapped_owner_breaks_the_manifest_signature() -> None:
    """A boot server that puts its own recipient in the manifest gets a manifest nobody accepts."""
    from dataclasses import replace

    from cidboot.errors import VerificationError
    from cidboot.trust.manifest import SignedManifest, sign_manifest, verify_threshold
    from cidboot.trust.manifest.signed import KIND_MANIFEST

    signer = keys.generate()
    root = RootOfTrust.from_public_keys([signer.public_key()], 1)
    m = Manifest(name="m", version=1, expires=2**31, layers=(), root=root,
                 owner=owner_of(Identity.generate()).to_obj())
    signed = SignedManifest.decode(sign_manifest(m, [signer]).encode())
    verify_threshold(signed.signatures, signed.payload(), root, "manifest", kind=KIND_MANIFEST)
    swapped = replace(signed, manifest=replace(signed.manifest, owner=owner_of(Identity.generate()).to_obj()))
    with pytest.raises(VerificationError):
        verify_threshold(swapped.signatures, swapped.payload(), root, "manifest", kind=KIND_MANIFEST)


# -- the agent seals, a third party validates -----------------------------------------------------

def _hello_with(tmp_path: Path, owner: Owner | None) -> Orchestrator:
    doc, flow, fcid = example("hello")
    ops = tmp_path / f"ops{len(list(tmp_path.glob('ops*')))}"
    ops.mkdir()
    (ops / "ops.py").write_text(f"def hello(name):\n    return {{'greeting': 'hello, ' + name + ' {MARKER}'}}\n")
    ctx = FlowContext(flow, fcid, "device", keys.generate(), doc["placement"], [], owner=owner)
    return Orchestrator(ctx, load_operations(flow, ops), MemoryBlocks())


@pytest.mark.parametrize("seal", ["results", "all"])
def test_hello_result_sealed_and_chain_validates_without_the_key(tmp_path: Path, seal: str) -> None:
    alice = Identity.generate()
    o = _hello_with(tmp_path, owner_of(alice, seal=seal))
    (r,) = asyncio.run(o.run())
    assert r.value == f"hello, world {MARKER}" and r.sealed is not None  # the agent itself knows it
    store: Any = o.store
    assert not any(MARKER.encode() in b for b in store.blocks.values())
    node = decode(store.get(r.cid), r.cid)
    verify_signature(node)  # the signature covers the sealed block's CID
    assert node.sealed == r.sealed and node.value is None
    assert open_value(store.get(node.sealed), [alice], node.sealed) == r.value
    seed = decode(store.get(node.parents[0]), node.parents[0])
    assert (seed.sealed is not None) == (seal == "all")
    # a third party: only the result's closure (what publishing sends), the flow, no key
    third = MemoryBlocks()
    for c, b in o.closure(r.cid):
        third.put(c, b)
    attested = AttestedAgents()
    attested.add_self(_raw(o.ctx.key), "device")
    v = Validator(o.ctx.flow, o.ctx.flow_cid, o.ctx.placement, attested, third.get, frozenset({_raw(o.ctx.key)}),
                  blind=True)
    assert v.validate(r.cid).definition == "greeting"
    assert len(v.unchecked) == (1 if seal == "all" else 0)  # the sealed seed: said, not passed
    # not blind and no opening: a sealed seed is refused (fail closed), a sealed result is fine
    strict = Validator(o.ctx.flow, o.ctx.flow_cid, o.ctx.placement, attested, third.get, frozenset({_raw(o.ctx.key)}))
    if seal == "all":
        with pytest.raises(TamperedParent, match="sealed"):
            strict.validate(r.cid)
        with pytest.raises(SealedValueUnknown):
            Validator(o.ctx.flow, o.ctx.flow_cid, o.ctx.placement, attested, third.get,
                      frozenset({_raw(o.ctx.key)})).validate(seed.cid)
    else:
        strict.validate(r.cid)


def _raw(key: Any) -> bytes:
    from cidboot.trust.cose_key import raw_public_bytes

    return raw_public_bytes(key.public_key())


def test_tampered_sealed_value_in_a_chain_fails_by_cid(tmp_path: Path) -> None:
    o = _hello_with(tmp_path, owner_of(Identity.generate()))
    (r,) = asyncio.run(o.run())
    store: Any = o.store
    blocks = dict(store.blocks)
    assert r.sealed is not None
    bad = bytearray(blocks[r.sealed])
    bad[len(bad) // 2] ^= 1
    blocks[r.sealed] = bytes(bad)
    attested = AttestedAgents()
    attested.add_self(_raw(o.ctx.key), "device")
    v = Validator(o.ctx.flow, o.ctx.flow_cid, o.ctx.placement, attested, blocks.__getitem__,
                  frozenset({_raw(o.ctx.key)}), blind=True)
    with pytest.raises(TamperedInput, match=str(r.sealed)):
        v.validate(r.cid)
    # another sealed block swapped in under the node: the node's signature names the original CID
    other, oblock, _ = seal_value("x", owner_of(Identity.generate()).raw)
    blocks[r.sealed], blocks[other] = oblock, oblock
    with pytest.raises(TamperedInput, match="does not match CID"):
        Validator(o.ctx.flow, o.ctx.flow_cid, o.ctx.placement, attested, blocks.__getitem__,
                  frozenset({_raw(o.ctx.key)}), blind=True).validate(r.cid)


def test_show_key_opens_for_the_owner_and_refuses_another_key(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from cidboot.store.blockstore import Blockstore

    owner_key, other_key = tmp_path / "owner.key", tmp_path / "other.key"
    store = Blockstore(tmp_path / "store")
    assert ib_main(["keygen", "--owner", str(owner_key)]) == 0
    recipient = capsys.readouterr().out.strip()
    assert ib_main(["keygen", "--owner", str(other_key)]) == 0
    capsys.readouterr()
    o2 = _hello_with(tmp_path, Owner((recipient,)))
    (r2,) = asyncio.run(o2.run())
    for c, b in o2.closure(r2.cid):
        store.put(c, b)
    args = ["show", str(r2.cid), "--store", str(store.path)]
    assert ib_main(args) == 0
    out = capsys.readouterr().out
    assert "sealed (age, 1 recipient)" in out and MARKER not in out
    assert ib_main([*args, "--key", str(owner_key)]) == 0
    assert f"value: hello, world {MARKER}" in capsys.readouterr().out
    assert ib_main([*args, "--key", str(other_key)]) == 1
    err = capsys.readouterr().err
    assert "not the flow owner's key" in err and MARKER not in err
    assert r2.sealed is not None
    assert ib_main(["show", str(r2.sealed), "--store", str(store.path), "--key", str(owner_key), "--json"]) == 0
    assert MARKER in capsys.readouterr().out


def test_no_owner_no_sealing(tmp_path: Path) -> None:
    o = _hello_with(tmp_path, None)
    (r,) = asyncio.run(o.run())
    assert r.sealed is None and decode(o.store.get(r.cid), r.cid).value == r.value


# -- two devices, seal: all: the intermediate value crosses with an opening ---------------------

def affirmed(key: Any, role: str) -> AppraisalResult:
    res = AppraisalResult(role=role, leaf_public_key=key.public_key())
    res.add("test", AFFIRMING, "attested in this test")
    return res


def _two_device(owner: Owner, tamper: Any = None) -> tuple[dict[str, Orchestrator], list[list[Block]]]:
    doc, flow, fcid = example("two-device")
    placement = doc["placement"]
    ops = load_operations(flow, REPO / "examples/two-device")
    orchs: dict[str, Orchestrator] = {}
    apps: dict[str, AppraisalResult] = {}
    for role in placement:
        key = keys.generate()
        apps[role] = affirmed(key, role)
        ctx = FlowContext(flow, fcid, role, key, placement, [], owner=owner)
        orchs[role] = Orchestrator(ctx, {k: v for k, v in ops.items() if k in placement[role]}, MemoryBlocks(),
                                   remote_wait=5)
    sent: list[list[Block]] = []
    for role, o in orchs.items():
        for peer in orchs:
            if peer != role:
                o.attested.add(apps[peer])

        def send(to: str, blocks: list[Block], sender: str = role) -> None:
            sent.append(blocks)
            orchs[to].accept(tamper(blocks) if tamper else blocks, apps[sender])
        o.send = send
    return orchs, sent


def _run_all(orchs: dict[str, Orchestrator]) -> None:
    from agent.commands.run import run_roles

    asyncio.run(run_roles(orchs))


def test_two_devices_seal_all_peer_gets_an_opening() -> None:
    alice = Identity.generate()
    orchs, sent = _two_device(owner_of(alice, seal="all"))
    _run_all(orchs)
    (total,) = orchs["aggregator"].results
    assert total.value == sum((i * 7) % 10 for i in range(5)) and total.sealed is not None
    (blocks,) = sent
    kinds = [next(iter(dagcbor.decode(b))) for _c, b in blocks]
    assert kinds.count("opening") == 2  # the readings and the sealed seed they came from
    agg: Any = orchs["aggregator"].store
    assert not any(next(iter(dagcbor.decode(b))) == "opening" for b in agg.blocks.values())  # never stored
    readings_node = decode(agg.get(decode(agg.get(total.cid)).parents[0]))
    assert readings_node.sealed is not None and readings_node.sealed in agg.blocks  # the sealed block was kept
    assert open_value(agg.get(total.sealed), [alice]) == total.value


def test_two_devices_seal_all_without_or_with_a_bad_opening_is_refused() -> None:
    alice = Identity.generate()

    def drop(blocks: list[Block]) -> list[Block]:
        return [(c, b) for c, b in blocks if next(iter(dagcbor.decode(b))) != "opening"]

    orchs, _ = _two_device(owner_of(alice, seal="all"), drop)
    _run_all(orchs)
    assert orchs["aggregator"].results == []
    assert any("SealedValueUnknown" in e.reason or "sealed" in e.reason for e in orchs["aggregator"].audit.find("refused"))

    def wrong_key(blocks: list[Block]) -> list[Block]:
        out = []
        for c, b in blocks:
            got = decode_opening(b)
            out.append(make_opening(got[0], os.urandom(16)) if got else (c, b))
        return out

    orchs, _ = _two_device(owner_of(alice, seal="all"), wrong_key)
    _run_all(orchs)
    assert orchs["aggregator"].results == []
    reasons = [e.reason for e in orchs["aggregator"].audit.find("refused")]
    assert any("do not open their sealed value" in r for r in reasons), reasons


def test_seal_results_leaves_intermediate_values_clear_and_seals_the_total() -> None:
    orchs, sent = _two_device(owner_of(Identity.generate()))
    _run_all(orchs)
    (total,) = orchs["aggregator"].results
    (readings,) = orchs["sensor"].results
    assert total.sealed is not None and readings.sealed is None  # readings feed summarise: not a result
    assert not any(next(iter(dagcbor.decode(b))) == "opening" for _c, b in sent[0])


def test_audit_reasons_carry_no_values_when_the_flow_has_an_owner(tmp_path: Path) -> None:
    doc, flow, fcid = example("hello")
    ops = tmp_path / "ops"
    ops.mkdir()
    (ops / "ops.py").write_text(f"def hello(name):\n    raise ValueError('{MARKER} ' + name)\n")
    ctx = FlowContext(flow, fcid, "device", keys.generate(), doc["placement"], [],
                      owner=owner_of(Identity.generate()))
    o = Orchestrator(ctx, load_operations(flow, ops), MemoryBlocks())
    asyncio.run(o.run())
    (err,) = o.audit.find("error")
    assert "ValueError" in err.reason and MARKER not in err.reason


def test_dataflow_model_unchanged_by_owner() -> None:
    doc, flow, _ = example("hello")
    assert DataFlow.from_obj(doc["dataflow"]).cid == flow.cid
    seed_cid, seed = make_input(value="w", definition="name", flow=flow.cid, parents=[flow.cid], key=keys.generate())
    assert "sealed" not in dagcbor.decode(seed)["input"]


def test_agent_run_of_a_signed_manifest_with_an_owner_seals_every_value(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The owner comes from the signed manifest (not from anything unsigned); seal: all between the
    two roles of `agent run` (openings through send/accept), every value sealed in the store."""
    from agent import identity
    from cidboot.store.blockstore import Blockstore
    from tests.unit.test_agent_run import READINGS, agent_run, signed_two_device

    alice = Identity.generate()
    store = Blockstore(tmp_path / "store")
    mcid = signed_two_device(store, {"firmware": identity.DEV_FIRMWARE, "bootstrap": identity.DEV_BOOTSTRAP},
                             owner=owner_of(alice, seal="all").to_obj())
    rc, out, err = agent_run(capsys, str(mcid), "--identity", str(tmp_path / "id"), "--store", str(store.path))
    assert rc == 0, err
    assert set(out["results"]) == {"readings", "total"}
    total = CID.parse(out["results"]["total"]["sealed"])
    assert open_value(store.get(total), [alice], total) == sum(READINGS)
    readings = CID.parse(out["results"]["readings"]["sealed"])
    assert open_value(store.get(readings), [alice], readings) == READINGS
    node = decode(store.get(CID.parse(out["result_cids"]["total"])))
    assert node.sealed == total


def test_openings_of_refused_inputs_are_forgotten() -> None:
    """A peer cannot make an agent hold values it refused: the openings of a refused exchange go."""
    orchs, sent = _two_device(owner_of(Identity.generate(), seal="all"))
    _run_all(orchs)
    (blocks,) = sent
    fresh, _ = _two_device(owner_of(Identity.generate(), seal="all"))
    agg = fresh["aggregator"]
    agg.attested = AttestedAgents()  # the sensor is not attested here
    agg.validator.attested = agg.attested
    assert agg.accept(blocks, None) == []
    assert any("UnattestedProducer" in e.reason for e in agg.audit.find("refused"))
    assert agg._opened == {} and agg._batch_opened == {}
    # the same exchange, attested: the values the admitted input links are kept
    assert orchs["aggregator"]._opened


def test_a_value_that_cannot_be_sealed_is_an_audited_error_not_a_crash(tmp_path: Path) -> None:
    doc, flow, fcid = example("hello")
    ops = tmp_path / "ops"
    ops.mkdir()
    (ops / "ops.py").write_text("def hello(name):\n    return {'greeting': float('nan')}\n")
    flow.definitions["greeting"] = type(flow.definitions["greeting"])("greeting", "float")
    ctx = FlowContext(flow, fcid, "device", keys.generate(), doc["placement"], [], owner=owner_of(Identity.generate()))
    o = Orchestrator(ctx, load_operations(flow, ops), MemoryBlocks())
    assert asyncio.run(o.run()) == []
    (err,) = o.audit.find("error")
    assert "not DAG-CBOR" in err.reason
