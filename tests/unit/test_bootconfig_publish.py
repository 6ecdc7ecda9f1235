"""Where agents publish results comes with the boot config (`bootstrap serve --publish`): the key
round-trips, a malformed target is refused at the config and at the command line, and the
device agent takes it as its publish target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.publish import PublishTarget
from bootstrap.cli import main as bootstrap
from cidboot.ipld.cid import CID, DAG_CBOR
from cidboot.netboot.bootconfig import BootConfig, BootConfigError

M = CID.of(b"manifest", DAG_CBOR)


def test_publish_round_trips_and_the_agent_parses_it() -> None:
    cfg = BootConfig(M, ("http://gw",), publish="cluster=http://10.77.0.1:9094,replication=2:2")
    back = BootConfig.decode(cfg.encode())
    assert back == cfg
    target = PublishTarget.parse(back.publish or "")
    assert (target.kind, target.url, target.replication) == ("cluster", "http://10.77.0.1:9094", "2:2")
    assert b"publish" not in BootConfig(M, ("http://gw",)).encode()  # absent unless set: old bytes unchanged


@pytest.mark.parametrize("value", ["http://x", "cluster=ftp://x", "ipfs=http://x", 7, ["cluster=http://x"]])
def test_malformed_publish_target_is_refused(value: object) -> None:
    raw = json.dumps({"version": 1, "manifest": str(M), "gateways": ["http://gw"], "publish": value}).encode()
    with pytest.raises(BootConfigError, match="publish must be kubo=URL or cluster=URL"):
        BootConfig.decode(raw)


def test_serve_refuses_a_malformed_publish_target_as_a_usage_error(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = bootstrap(["serve", "--interface", "lo", "--dhcp-range", "127.0.0.100-127.0.0.110", "--store",
                    str(tmp_path), "--manifest", str(M), "--publish", "cluster=ftp://x"])
    assert rc == 2
    assert "--publish: boot config: publish must be" in capsys.readouterr().err
