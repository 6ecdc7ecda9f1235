"""Agents' `--publish cluster=URL[,replication=MIN:MAX]`: the target is parsed strictly, and each
root's whole DAG goes as one CAR through the cluster's REST API, then publishing waits for MIN
peers. The real 3-peer cluster is in tests/integration/test_agent_publish_cluster_integration.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from agent.publish import PublishTarget, publish
from cidboot.errors import FormatError
from cidboot.ipld import dagcbor
from cidboot.ipld.car import CarReader
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.store.blockstore import BlockNotFound, Blockstore
from cidboot.store.cluster import BadReplication, Replication


def test_parse_cluster_targets() -> None:
    assert PublishTarget.parse("cluster=http://10.0.0.5:9094") == PublishTarget("cluster", "http://10.0.0.5:9094", "2:3")
    t = PublishTarget.parse("cluster=http://h:9094,replication=1:2")
    assert (t.kind, t.url, t.replication) == ("cluster", "http://h:9094", "1:2")
    assert PublishTarget.parse("kubo=http://h:5001") == PublishTarget("kubo", "http://h:5001")
    for bad in ("cluster=h:9094", "swarm=http://h", "cluster=", "kubo=http://h:5001,replication=2",
                "cluster=http://h:9094,copies=2"):
        with pytest.raises(FormatError):
            PublishTarget.parse(bad)
    with pytest.raises(BadReplication):
        PublishTarget.parse("cluster=http://h:9094,replication=3:1")


class FakeCluster:
    """What publish asks of cidboot.store.cluster.ClusterClient, recorded."""

    def __init__(self) -> None:
        self.cars: list[tuple[list[CID], dict[CID, bytes], Replication, str]] = []
        self.waited: list[tuple[CID, Replication]] = []

    def add_car(self, path: str, replication: Replication, *, root: CID, name: str) -> Any:
        reader = CarReader(io.BytesIO(Path(path).read_bytes()))  # verifies every section
        self.cars.append((reader.roots, dict(reader), replication, name))
        assert reader.roots == [root]

    def wait_for(self, cid: CID, replication: Replication, *, timeout: float) -> Any:
        self.waited.append((cid, replication))


def test_each_root_goes_as_one_car_with_its_whole_dag_then_waits(tmp_path: Path) -> None:
    store = Blockstore(tmp_path)
    parent = store.put_block(dagcbor.encode({"v": 1}), DAG_CBOR)
    result = store.put_block(dagcbor.encode({"parents": [parent], "v": 2}), DAG_CBOR)
    audit = store.put_block(dagcbor.encode({"entry": 0, "about": result}), DAG_CBOR)
    fake = FakeCluster()
    target = PublishTarget.parse("cluster=http://h:9094,replication=2:2")
    assert publish(store, [result, audit, result], target, client=fake, label="run") == 2 + 3
    assert [c[0] for c in fake.cars] == [[result], [audit]]  # each root once
    assert set(fake.cars[0][1]) == {result, parent} and set(fake.cars[1][1]) == {audit, result, parent}
    assert all(c[2] == Replication(2, 2) for c in fake.cars) and fake.cars[0][3] == f"run {result}"
    assert fake.waited == [(result, Replication(2, 2)), (audit, Replication(2, 2))]
    assert not list(tmp_path.glob("cidboot-publish-*"))


def test_incomplete_dag_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    store = Blockstore(tmp_path)
    missing = CID.of(dagcbor.encode({"v": 9}), DAG_CBOR)
    result = store.put_block(dagcbor.encode({"parents": [missing]}), DAG_CBOR)
    fake = FakeCluster()
    with pytest.raises(BlockNotFound):
        publish(store, [result], PublishTarget.parse("cluster=http://h:9094"), client=fake)
    assert fake.cars == []
