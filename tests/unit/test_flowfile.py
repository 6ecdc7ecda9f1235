"""Bad flow files: each problem reported at file:line:column with the offending key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cidboot.trust import keys
from imagebuilder import flowfile
from imagebuilder.flowfile import FlowFileError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    d = tmp_path / "hello"
    shutil.copytree(EXAMPLES / "hello", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    keys.write_keypair(keys.generate(), d / "keys/signer-1")
    return d / "flow.yaml"


def _edit(flow: Path, old: str, new: str) -> Path:
    text = flow.read_text()
    assert old in text, old
    flow.write_text(text.replace(old, new, 1))
    return flow


def _errors(flow: Path) -> list[str]:
    with pytest.raises(FlowFileError) as exc:
        flowfile.load(flow)
    return [p.replace(f"{flow}:", "F:") for p in exc.value.problems]


def test_examples_are_valid(tmp_path: Path, hello: Path) -> None:
    ff = flowfile.load(hello)
    assert ff.name == "hello" and ff.target == "image"
    two = tmp_path / "two"
    shutil.copytree(EXAMPLES / "two-device", two, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    for i in (1, 2):
        keys.write_keypair(keys.generate(), two / f"keys/signer-{i}")
    ff2 = flowfile.load(two / "flow.yaml")
    assert flowfile.operation_edges(ff2.data["dataflow"]) == {"sample": {"summarise"}, "summarise": set()}


def test_unknown_key(hello: Path) -> None:
    _edit(hello, "  cmdline: console", "  cmdlin: console")
    assert _errors(hello) == ["F:10:3: image.cmdlin: unknown key"]


def test_unknown_top_level_key(hello: Path) -> None:
    hello.write_text(hello.read_text() + "extra: 1\n")
    assert _errors(hello) == ["F:42:1: extra: unknown key"]


def test_wrong_type(hello: Path) -> None:
    _edit(hello, "version: 1", "version: one")
    assert _errors(hello) == ["F:5:10: version: 'one' is not of type 'integer' (schema: type)"]


def test_missing_required(hello: Path) -> None:
    _edit(hello, "  threshold: 1\n", "")
    assert _errors(hello) == ["F:38:1: trust: 'threshold' is a required property"]


def test_duplicate_key(hello: Path) -> None:
    _edit(hello, "version: 1\n", "version: 1\nversion: 2\n")
    assert _errors(hello) == ["F:6:1: version: duplicate key"]


def test_yaml_syntax_error(hello: Path) -> None:
    _edit(hello, "  cmdline: console=ttyS0 quiet", "  cmdline: [console")
    (err,) = _errors(hello)
    assert err.startswith("F:11:") and "<yaml>" in err


def test_cycle(hello: Path) -> None:
    _edit(hello, "      outputs: {greeting: greeting}", "      outputs: {greeting: name}")
    assert _errors(hello) == ["F:25:5: dataflow.operations.hello: cycle: hello -> hello"]


def test_two_operation_cycle(tmp_path: Path) -> None:
    d = tmp_path / "two"
    shutil.copytree(EXAMPLES / "two-device", d, ignore=shutil.ignore_patterns("keys", "flow.lock", "__pycache__"))
    for i in (1, 2):
        keys.write_keypair(keys.generate(), d / f"keys/signer-{i}")
    flow = _edit(d / "flow.yaml", "    sample: {inputs: {count: [seed]}}",
                 "    sample: {inputs: {count: [{summarise: total}]}}")
    # summarise.total is a `total`: the agent refuses to feed it to a `count` parameter, and so does the builder
    assert _errors(flow) == ["F:35:43: dataflow.flow.sample.inputs.count.0.summarise: "
                             "summarise.total is a total, not a count (definitions are locked to parameters)"]
    _edit(flow, "      outputs: {total: total}", "      outputs: {total: count}")
    assert _errors(flow) == ["F:23:5: dataflow.operations.sample: cycle: sample -> summarise -> sample"]


def test_undefined_definition(hello: Path) -> None:
    _edit(hello, "      inputs: {name: name}", "      inputs: {name: nme}")
    assert _errors(hello) == ["F:27:22: dataflow.operations.hello.inputs.name: undefined definition 'nme'"]


def test_missing_implementation_function(hello: Path) -> None:
    _edit(hello, "implementation: ops:hello", "implementation: ops:goodbye")
    assert _errors(hello) == ["F:26:23: dataflow.operations.hello.implementation: "
                              "missing implementation: ops.py defines no function 'goodbye'"]


def test_missing_implementation_module(hello: Path) -> None:
    _edit(hello, "implementation: ops:hello", "implementation: greet.ops:hello")
    assert _errors(hello) == ["F:26:23: dataflow.operations.hello.implementation: "
                              "missing implementation: module file greet/ops.py not found beside the flow"]


def test_malformed_implementation(hello: Path) -> None:
    _edit(hello, "implementation: ops:hello", "implementation: ops.hello")
    (err,) = _errors(hello)
    assert err.startswith("F:26:23: dataflow.operations.hello.implementation: 'ops.hello' does not match")


def test_placement_of_unknown_operation(hello: Path) -> None:
    _edit(hello, "  device: [hello]", "  device: [hello, bye]")
    assert _errors(hello) == ["F:33:19: placement.device.1: unknown operation 'bye'"]


def test_every_problem_is_listed(hello: Path) -> None:
    _edit(hello, "      inputs: {name: name}", "      inputs: {name: nme}")
    _edit(hello, "  device: [hello]", "  device: [bye]")
    assert len(_errors(hello)) == 2


def test_threshold_above_keys(hello: Path) -> None:
    _edit(hello, "  threshold: 1", "  threshold: 2")
    assert _errors(hello) == ["F:40:14: trust.threshold: threshold 2 exceeds the 1 key(s)"]


def test_absolute_path_rejected(hello: Path) -> None:
    _edit(hello, "etc/greeting.txt: greeting.txt", "etc/greeting.txt: /etc/passwd")
    (err,) = _errors(hello)
    assert err.startswith("F:13:23: image.files.etc/greeting.txt: '/etc/passwd' does not match")


def test_unknown_kernel_package_in_lock(hello: Path) -> None:
    ff = flowfile.load(_edit(hello, "linux-image-cloud-amd64", "linux-image-9.9.9-cloud-amd64"))
    with pytest.raises(FlowFileError) as exc:
        flowfile.check_lock(ff, {"linux-image-cloud-amd64": {"version": "6.1.192-2"}}, {})
    assert exc.value.problems[0] == (
        f"{hello}:8:14: image.kernel.package: unknown kernel package 'linux-image-9.9.9-cloud-amd64': "
        f"not in the lock (run `imagebuilder lock {hello}`)")


def test_empty_and_non_mapping(tmp_path: Path) -> None:
    f = tmp_path / "flow.yaml"
    f.write_text("")
    assert _errors(f) == ["F:1:1: <root>: empty flow file"]
    f.write_text("- a\n- b\n")
    assert _errors(f) == ["F:1:1: <root>: a flow file is a mapping, got list"]


@pytest.mark.parametrize(("old", "new", "message"), [
    ("  cmdline: console", "  cmdlin: console", "image.cmdlin: unknown key"),
    ("inputs: {name: name}", "inputs: {name: nme}", "undefined definition 'nme'"),
    ("outputs: {greeting: greeting}", "outputs: {greeting: name}", "cycle: hello -> hello"),
    ("implementation: ops:hello", "implementation: ops:bye", "missing implementation"),
])
def test_cli_build_of_bad_flow_writes_nothing(hello: Path, tmp_path: Path, old: str, new: str, message: str) -> None:
    import subprocess
    import sys

    _edit(hello, old, new)
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(hello), "--store", str(store)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"imagebuilder: error: {hello}:") and message in proc.stderr
    assert not store.exists()


def test_cli_build_with_unknown_kernel_package_writes_nothing(hello: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    _edit(hello, "linux-image-cloud-amd64", "linux-image-0.0.0-nope-amd64")
    (hello.parent / "flow.lock").write_text(json.dumps({"lock_version": 1, "debs": {}, "wheels": {}}))
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "imagebuilder", "build", str(hello), "--store", str(store)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert (f"{hello}:8:14: image.kernel.package: unknown kernel package 'linux-image-0.0.0-nope-amd64': "
            f"not in the lock (run `imagebuilder lock {hello}`)") in proc.stderr
    assert not store.exists()
