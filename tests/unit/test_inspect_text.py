"""`imagebuilder inspect` text output is for people: an ISO 8601 expiry, operations and policies
as flow.yaml writes them, never Python reprs (it printed `expires 1893456000`,
`{'words': 'words'} -> {'count': 'count'}` and `policy {'name': ..., 'veto': {...}}`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from cidboot.ipld.cid import CID, DAG_CBOR
from imagebuilder.commands import inspect

M = CID.of(b"manifest", DAG_CBOR)
DESCRIBED: dict[str, Any] = {
    "manifest": str(M), "name": "word-count", "version": 1, "expires": 1893456000, "expires_utc": "2030-01-01T00:00:00Z",
    "cmdline": "console=ttyS0", "layers": [], "measurements": {}, "pinned": {"image": True}, "flow_cid": "bafyflow",
    "flow": {"operations": {"count": {"inputs": {"words": "words"}, "outputs": {"count": "count"},
                                      "implementation": "ops:count"}}, "edges": [["split", "count"]]},
    "operations": {"count": "bafkcode"}, "placement": {"device": ["split", "count"]},
    "policies": [{"name": "count-only-split-words", "veto": {"operation": "count", "producer": "seed"}},
                 {"name": "measured", "veto": {"operation": ["a", "b"]}, "unless": {"measurement": "image"}}],
    "root": {"threshold": 1, "keys": 1},
}


def test_inspect_text_has_iso_dates_and_no_python_reprs(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(inspect, "describe", lambda store, cid, files=True, secret=None: DESCRIBED)
    assert inspect.run(argparse.Namespace(cid=M, store=tmp_path, no_files=True, json=False, flow_secret=None)) == 0
    out = capsys.readouterr().out
    assert "expires 2030-01-01T00:00:00Z" in out and "1893456000" not in out
    assert "  count = ops:count(words: words) -> count: count  code bafkcode" in out
    assert "policy count-only-split-words: veto operation=count producer=seed" in out
    assert "policy measured: veto operation=a,b unless measurement=image" in out
    assert "{" not in out and "'" not in out, out


def test_describe_names_expires_utc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cidboot.ipld.cid import RAW
    from cidboot.store.blockstore import Blockstore
    from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest

    key = ed25519.Ed25519PrivateKey.generate()
    m = Manifest("x", 1, 1893456000, (Layer(CID.of(b"k", RAW), 1, "kernel"),),
                 RootOfTrust.from_public_keys([key.public_key()], 1), {})
    signed = sign_manifest(m, [key])
    store = Blockstore(tmp_path / "s")
    store.put(signed.cid, signed.encode())
    d = inspect.describe(store, signed.cid, files=False)
    assert d["expires"] == 1893456000 and d["expires_utc"] == "2030-01-01T00:00:00Z"
