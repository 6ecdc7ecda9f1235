"""Load flow.yaml: its schema, its image sections, and the shared flow checks, each problem at file:line:column.

A flow file is what users write first, and a build must never start from a flow that cannot
run, so every problem is reported before anything reaches a store, in the form
`flow.yaml:12:7: dataflow.operations.hello.inputs.name: undefined definition 'nme'`.
This module owns only what is the builder's: the JSON schema, the image and trust sections
and the lock. What the flow means (auto-flow, cycles, seeds, implementations, placement,
policies) is checked by `cidboot.dataflow.checks`, the same validator `agent run` and the
harness call, so the builder never signs a flow the agent reads another way; each of its
problems is mapped here to the YAML position it came from (`cidboot.dataflow.source`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from cidboot.dataflow import checks
from cidboot.dataflow.checks import FlowError, Path_, Problem, find_cycle, operation_edges
from cidboot.dataflow.source import Located, parse_yaml

__all__ = ["FlowFile", "FlowFileError", "check_lock", "find_cycle", "implementation_file", "load", "operation_edges",
           "parse", "schema"]


class FlowFileError(FlowError):
    """The flow file is malformed or inconsistent; `problems` lists every finding as
    `file:line:col: dotted.key: message`, `details` the Problems (code, path) behind them."""

    def __init__(self, problems: list[str], details: Sequence[Problem] = ()) -> None:
        super().__init__(list(details), problems)


class FlowFile(Located):
    """A checked flow file: the plain data plus where each value was written."""

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def target(self) -> str:
        return str(self.data.get("target", "image"))

    @property
    def encrypt(self) -> bool:
        """`encrypt: true`: every layer encrypted under the flow secret (docs/privacy.md)."""
        return self.data.get("encrypt") is True

    def fail(self, problems: list[Problem]) -> FlowFileError:
        e = super().fail(problems)
        return FlowFileError(e.problems, e.details)


@cache
def schema() -> dict[str, Any]:
    text = resources.files("imagebuilder").joinpath("schema/flow.schema.json").read_text()
    return dict(json.loads(text))


def parse(text: str, path: Path) -> FlowFile:
    """YAML text to a FlowFile with positions; YAML syntax errors keep their own position."""
    try:
        doc = parse_yaml(text, path)
    except FlowError as e:
        raise FlowFileError(e.problems, e.details) from None
    return FlowFile(doc.path, doc.data, doc.marks, doc.key_marks)


def _schema_problems(ff: FlowFile) -> list[str]:
    out: list[tuple[tuple[int, int], str]] = []
    validator = jsonschema.Draft202012Validator(schema())
    for err in validator.iter_errors(ff.data):
        # a oneOf failure is clearer through its closest branch
        best = jsonschema.exceptions.best_match([err])
        at: Path_ = tuple(best.absolute_path)
        if best.validator == "additionalProperties" and isinstance(best.instance, dict):
            allowed = set(best.schema.get("properties", {}))
            for extra in sorted(k for k in best.instance if k not in allowed):
                kat = (*at, extra)
                out.append((ff.key_marks.get(kat, (1, 1)), ff.error(kat, "unknown key", key=True)))
            if allowed:
                continue
        if best.validator == "required":
            # point at the mapping's own key ("trust:"), where the missing entry belongs
            out.append((ff.key_marks.get(at, ff.marks.get(at, (1, 1))), ff.error(at, best.message, key=True)))
            continue
        elif best.validator in ("type", "enum", "const", "pattern", "minimum", "maximum", "minItems",
                                "minProperties", "uniqueItems", "minLength", "maxLength", "maxProperties"):
            msg = f"{best.message} (schema: {best.validator})"
        else:
            msg = best.message
        out.append((ff.marks.get(at, (1, 1)), ff.error(at, msg)))
    return [m for _, m in sorted(out)]


def implementation_file(ff: FlowFile, implementation: str) -> Path:
    """Where the operation's module lives: `pkg.mod:fn` is `pkg/mod.py` beside the flow file."""
    module = implementation.split(":", 1)[0]
    return ff.dir / (module.replace(".", "/") + ".py")


def _image_problems(ff: FlowFile, require_keys: bool) -> list[Problem]:
    """The builder's own sections: trust keys and threshold, kernel and extra files."""
    p: list[Problem] = []
    if ff.encrypt and ff.target != "image":  # nothing below an image can ask a key broker
        p.append(Problem("encrypt-target", ("encrypt",),
                         f"encrypt: true is for images (target: image); a {ff.target} is loaded by a stage "
                         f"that holds no layer keys"))
    trust = ff.data["trust"]
    if trust["threshold"] > len(trust["keys"]):
        p.append(Problem("threshold", ("trust", "threshold"),
                         f"threshold {trust['threshold']} exceeds the {len(trust['keys'])} key(s)"))
    for i, k in enumerate(trust["keys"] if require_keys else []):
        if not (ff.dir / k).is_file():
            p.append(Problem("missing-file", ("trust", "keys", i), f"signing key {k} not found beside the flow"))
    image = ff.data["image"]
    kpath = image["kernel"].get("path")
    if kpath and not (ff.dir / kpath).is_file():
        p.append(Problem("missing-file", ("image", "kernel", "path"), f"kernel file {kpath} not found beside the flow"))
    for dest, src in (image.get("files") or {}).items():
        if not (ff.dir / src).is_file():
            p.append(Problem("missing-file", ("image", "files", dest), f"file {src} not found beside the flow"))
    return p


def load(path: str | Path, *, require_keys: bool = True) -> FlowFile:
    """Read, validate and check a flow file; raises FlowFileError listing every problem.
    `require_keys=False` (for `lock`, which signs nothing) skips the signing-key files check."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FlowFileError([f"{path}: cannot read: {e.strerror}"]) from None
    ff = parse(text, path)
    lines = _schema_problems(ff)
    if lines:
        raise FlowFileError(lines)
    _flow, problems = checks.check(ff.data, modules=checks.modules_beside(ff.dir), file_keys=True)
    problems += _image_problems(ff, require_keys)
    if problems:
        raise ff.fail(problems)
    return ff


def check_lock(ff: FlowFile, debs: dict[str, Any], wheels: dict[str, Any]) -> None:
    """Every Debian package and wheel the flow names must be pinned in its lock."""
    p: list[str] = []
    image = ff.data["image"]
    kernel = image["kernel"]
    if "package" in kernel:
        pin = debs.get(kernel["package"])
        if pin is None:
            p.append(ff.error(("image", "kernel", "package"),
                              f"unknown kernel package {kernel['package']!r}: not in the lock (run `imagebuilder lock {ff.path}`)"))
        elif kernel.get("version") and pin["version"] != kernel["version"]:
            p.append(ff.error(("image", "kernel", "version"),
                              f"lock pins {pin['version']}, flow asks {kernel['version']} (run `imagebuilder lock {ff.path}`)"))
    py = image.get("python") or {}
    for i, name in enumerate((py.get("runtime") or {}).get("packages", [])):
        if name not in debs:
            p.append(ff.error(("image", "python", "runtime", "packages", i),
                              f"unknown package {name!r}: not in the lock (run `imagebuilder lock {ff.path}`)"))
    for i, name in enumerate(py.get("wheels") or []):
        if name.partition("==")[0].lower() not in wheels:
            p.append(ff.error(("image", "python", "wheels", i),
                              f"unknown wheel {name!r}: not in the lock (run `imagebuilder lock {ff.path}`)"))
    if p:
        raise FlowFileError(p)
