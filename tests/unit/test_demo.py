"""`make demo` stays true: the demo runs end to end and its device is appraised affirming."""

import json
from pathlib import Path

from examples.demo import main


def test_demo_end_to_end(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "demo")]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    (dev,) = report["devices"]
    assert dev["appraisal"]["status"] == "affirming"
    assert dev["flow_result"] == {"greeting": "hello from cidboot"}
    assert dev["fetch"]["blocks"] == 2  # the manifest block and the greeting
