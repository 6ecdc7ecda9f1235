"""`imagebuilder references`: the list, --json and --corim (decoded back: the same values the
appraisal derives), from a manifest CID or file, with the UKI by file or by CID; usage errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cidboot.ipld.unixfs import import_file
from cidboot.store.blockstore import Blockstore
from cidboot.trust import corim
from cidboot.trust.tpm.reference import bootstrap_events, uki_applications
from imagebuilder.cli import main
from tests.support.soft_tpm import small_uki
from tests.unit.test_ear_corim import MANIFEST, SIGNED


@pytest.fixture
def store(tmp_path: Path) -> Blockstore:
    s = Blockstore(tmp_path / "store")
    s.put(SIGNED.cid, SIGNED.encode())
    return s


def test_corim_export_decodes_to_the_appraisal_references(store: Blockstore, tmp_path: Path) -> None:
    uki = tmp_path / "bootstrap.efi"
    uki.write_bytes(small_uki())
    out = tmp_path / "refs.corim"
    assert main(["references", str(SIGNED.cid), "--store", str(tmp_path / "store"), "--uki", str(uki), "--corim",
                 "-o", str(out)]) == 0
    c = corim.parse_corim(out.read_bytes())
    assert c.id == f"cidboot:{SIGNED.cid}"
    assert c.measurement("bootstrap UKI", "uki").digests[0][1] == uki_applications(small_uki())[0]
    for e in bootstrap_events(SIGNED.cid, MANIFEST):
        assert c.measurement(f"{MANIFEST.name} bootstrap events", e.what).digests[0][1] == e.digest


def test_list_and_json_from_file_and_uki_by_cid(store: Blockstore, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.cbor").write_bytes(SIGNED.encode())
    (tmp_path / "u.efi").write_bytes(small_uki())
    ucid = import_file(tmp_path / "u.efi", store).cid
    assert main(["references", str(tmp_path / "m.cbor"), "--store", str(tmp_path / "store"), "--uki", str(ucid), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    models = [e["model"] for e in doc["environments"]]
    assert models == [f"{MANIFEST.name} image", f"{MANIFEST.name} bootstrap events", "firmware", "bootstrap UKI"]
    pcr = doc["environments"][1]["measurements"][-1]
    assert pcr["key"] == "pcr15" and set(pcr["pcrs"]) == {"15"}
    assert main(["references", str(SIGNED.cid), "--store", str(tmp_path / "store")]) == 0
    text = capsys.readouterr().out
    assert f"cidboot manifest {SIGNED.cid}: sha-256" in text and "PCR 15 sha-256" in text


def test_errors(store: Blockstore, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["references", "not-a-cid", "--store", str(tmp_path / "store")]) == 1
    assert "neither a file nor a CID" in capsys.readouterr().err
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdout", tty)
    assert main(["references", str(SIGNED.cid), "--store", str(tmp_path / "store"), "--corim"]) == 1
    assert "-o FILE" in capsys.readouterr().err
