"""The conventions every CLI shares (cidboot/cli.py), checked the way a user meets them:
`--version`, errors as one `prog: error: ...` line on stderr, exit 2 for usage errors,
`--log-json` covering every stderr line (progress, refusals, errors), tracebacks under -v,
and a server that cannot bind naming the address."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.cli import main as agent_main
from cidboot import __version__
from cidboot.cli import JsonLines
from cidboot.ipld.cid import CID, RAW
from cidboot.store.blockstore import Blockstore
from cidboot.trust.manifest import Layer, Manifest, RootOfTrust, sign_manifest
from imagebuilder.cli import main as ib_main

REPO = Path(__file__).resolve().parents[2]
CLIS = [("imagebuilder", "imagebuilder"), ("bootstrap", "bootstrap"), ("agent", "agent"), ("firmware", "firmware"),
        ("qemu.harness", "python -m qemu.harness")]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("module,prog", CLIS)
def test_version_on_every_cli(module: str, prog: str) -> None:
    out = run(module, "--version")
    assert out.returncode == 0 and out.stdout == f"{prog} {__version__}\n" and out.stderr == ""


@pytest.mark.parametrize("module,prog", CLIS)
def test_usage_errors_are_one_line_on_stderr_exit_2(module: str, prog: str) -> None:
    out = run(module, "--no-such-option")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"{prog}: error: unrecognized arguments")


def test_missing_root_file_is_an_error_on_stderr_not_a_failed_check_on_stdout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `✗ KeyFileError: ...` on stdout."""
    signer = ed25519.Ed25519PrivateKey.generate()
    m = Manifest("m", 1, 2_000_000_000, (Layer(CID.of(b"k", RAW), 1, "kernel"),),
                 RootOfTrust.from_public_keys([signer.public_key()], 1))
    (tmp_path / "m.cbor").write_bytes(sign_manifest(m, [signer]).encode())
    rc = ib_main(["verify", str(tmp_path / "m.cbor"), "--root", str(tmp_path / "nope.json"), "--no-layers"])
    out = capsys.readouterr()
    assert rc == 1 and out.out == ""
    assert out.err.startswith("imagebuilder: error: ") and "nope.json" in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize("flow", ["examples/hello/flow.yaml", "examples/two-device/flow.yaml"])
def test_agent_run_with_a_role_the_flow_does_not_have_is_a_usage_error(
        flow: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: exit 1 (two-device), or a silent run of nothing (hello has no placement)."""
    rc = agent_main(["run", str(REPO / flow), "--identity", str(tmp_path / "id"), "--store", str(tmp_path / "s"),
                     "--role", "nosuch"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("agent: error: --role nosuch: the flow's roles are ")


@pytest.mark.parametrize("argv", [
    ["attest", "http://127.0.0.1:9", "--store", "/tmp"],
    ["attest", "http://127.0.0.1:9", "--verifier", "http://127.0.0.1:9", "--allow-unmeasured"],
    ["verify-evidence", "/dev/null", "--nonce", "zz", "--roots", "r", "--manifest", "m"],
])
def test_contradictory_or_malformed_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(argv) == 2
    assert capsys.readouterr().err.startswith("agent: error: --")


def test_log_json_covers_refusal_lines_and_errors(tmp_path: Path) -> None:
    """`agent run` prints vetoes/refusals on stderr; with --log-json they are JSON objects."""
    doc = yaml.safe_load((REPO / "examples/hello/flow.yaml").read_text())
    doc["policies"] = [{"name": "no-greetings-from-seeds", "veto": {"operation": "hello", "producer": "seed"}}]
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "ops.py").write_text((REPO / "examples/hello/ops.py").read_text())
    out = run("agent", "run", str(tmp_path / "flow.yaml"), "--identity", str(tmp_path / "id"),
              "--store", str(tmp_path / "s"), "--log-json")
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stderr.splitlines()]  # every line is JSON
    veto = [rec for rec in lines if "veto" in rec["msg"]]
    assert veto and veto[0]["level"] == "warning" and veto[0]["logger"] == "agent"
    assert veto[0]["msg"].startswith("device: veto: policy no-greetings-from-seeds")
    bad = run("imagebuilder", "cat", "not-a-cid", "--log-json")
    rec = json.loads(bad.stderr)
    assert bad.returncode == 1 and rec["level"] == "error" and rec["msg"].startswith("invalid CID")
    usage = run("imagebuilder", "--log-json", "cat")
    assert usage.returncode == 2 and json.loads(usage.stderr)["level"] == "error"


def test_json_lines_turns_printed_progress_into_log_records() -> None:
    """imagebuilder build/lock print `imagebuilder: ...` progress; a TTY redraw ends in \\r."""
    buf = io.StringIO()
    w = JsonLines("imagebuilder", buf)
    w.write("imagebuilder: pinned linux-image 6.1\n")
    w.write('{"level": "debug", "msg": "already json"}\n')
    w.write("imagebuilder build: warning: slow mirror\n")
    w.write("layer: 1.0 MiB\rlayer: 2.0 MiB")  # the last redraw has no newline until flush
    w.flush()
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(r["level"], r["msg"]) for r in recs] == [
        ("info", "pinned linux-image 6.1"), ("debug", "already json"), ("warning", "slow mirror"),
        ("info", "layer: 1.0 MiB"), ("info", "layer: 2.0 MiB")]


def test_traceback_under_verbose_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert ib_main(["cat", "not-a-cid"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert ib_main(["-v", "cat", "not-a-cid"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("imagebuilder: error: invalid CID")


def test_gateway_bind_failure_names_the_address_and_cause(tmp_path: Path) -> None:
    """Was: `bootstrap: error: Address already in use`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("bootstrap", "gateway", "--listen", f"127.0.0.1:{port}", "--store", str(tmp_path))
    assert out.returncode == 1 and out.stdout == ""
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use: another process" in out.stderr
    bad = run("bootstrap", "gateway", "--listen", "nonsense", "--store", str(tmp_path))
    assert bad.returncode == 2 and "--listen must be HOST:PORT" in bad.stderr
    Blockstore(tmp_path)  # the store argument was a real directory all along


def test_an_unexpected_exception_is_one_error_line_and_a_traceback_under_v(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug must not dump a bare traceback into --log-json output; -v still shows it."""
    import imagebuilder.commands.gc as gc_cmd

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(gc_cmd, "collect", boom)
    assert ib_main(["gc", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "imagebuilder: error: internal error: RuntimeError: boom (run with -v for the traceback)\n"
    assert ib_main(["gc", "--store", str(tmp_path), "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "imagebuilder: error: internal error: RuntimeError: boom"
    assert ib_main(["gc", "--store", str(tmp_path), "--log-json"]) == 1
    assert json.loads(capsys.readouterr().err)["msg"].startswith("internal error: RuntimeError: boom")


def test_listen_error_names_where_and_why() -> None:
    import errno

    from cidboot.cli import listen_error

    e = OSError(errno.EADDRINUSE, "Address already in use")
    assert str(listen_error(e, "::1", 8080)).startswith("cannot listen on [::1]:8080: Address already in use: another")
    several = listen_error(e, "10.0.0.1", 8080, "serve", where="10.0.0.1 (one of UDP 67/4011 for DHCP, ...)")
    assert str(several).startswith("cannot serve on 10.0.0.1 (one of UDP 67/4011")
    assert "CAP_NET_BIND_SERVICE" in str(listen_error(OSError(errno.EACCES, "Permission denied"), "0.0.0.0", 80))
