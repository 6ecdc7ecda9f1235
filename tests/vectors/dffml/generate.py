"""Regenerates the DFFML export vectors in this folder with DFFML itself.

DFFML 0.4.0.post2 (the newest on PyPI) does not import on Python >= 3.11, so this runs under
an older interpreter, e.g.:

    python3.8 -m venv /tmp/dffml-venv38 && /tmp/dffml-venv38/bin/pip install dffml==0.4.0.post2
    /tmp/dffml-venv38/bin/python tests/vectors/dffml/generate.py tests/vectors/dffml

Each vector is exactly `DataFlow.export(linked=...)` (what `dffml dataflow create` writes,
linked unless `-not-linked`), with seed inputs added the way `dataflow create -inputs` does.
"""

import asyncio
import json
import sys
from pathlib import Path

from dffml import DataFlow, Definition, Input, Stage, op, run  # type: ignore[import-not-found]

CALLS = []  # (operation, sorted arguments) of every call DFFML's MemoryOrchestrator makes

# shouldi's operations (dffml/examples/shouldi), minus their network calls
package = Definition(name="package", primitive="str")
package_json = Definition(name="package_json", primitive="Dict[str, Any]")
package_version = Definition(name="package_version", primitive="str")
issues = Definition(name="safety_check_number_of_issues", primitive="int")


@op(inputs={"package": package}, outputs={"response_json": package_json})
def pypi_package_json(package: str) -> dict:
    return {"response_json": {"info": {"version": "1.0"}}}


@op(inputs={"response_json": package_json}, outputs={"version": package_version})
def pypi_latest_package_version(response_json: dict) -> dict:
    return {"version": response_json["info"]["version"]}


@op(inputs={"package": package, "version": package_version}, outputs={"result": issues})
def safety_check(package: str, version: str) -> dict:
    return {"result": 0}


# a flow with a condition, expand, a locked definition and cleanup/output stages
n = Definition(name="n", primitive="int")
item = Definition(name="item", primitive="int")
sq = Definition(name="sq", primitive="int")
ok = Definition(name="ok", primitive="bool")
shared = Definition(name="shared", primitive="str", lock=True)
total = Definition(name="total", primitive="int")


@op(inputs={"n": n}, outputs={"item": item}, expand=["item"])
def count(n: int) -> dict:
    CALLS.append(["count", {"n": n}])
    return {"item": list(range(n))}


@op(inputs={"x": item, "s": shared}, outputs={"sq": sq}, conditions=[ok])
def square(x: int, s: str) -> dict:
    CALLS.append(["square", {"s": s, "x": x}])
    return {"sq": x * x}


@op(inputs={"x": sq}, outputs={"total": total}, stage=Stage.OUTPUT)
def report(x: int) -> dict:
    CALLS.append(["report", {"x": x}])
    return {"total": x}


def main(out: Path) -> None:
    shouldi = DataFlow(pypi_package_json, pypi_latest_package_version, safety_check)
    shouldi.seed.append(Input(value="insecure-package", definition=package))
    shouldi.flow["safety_check"].inputs["package"] = [{"seed": ["package"]}]  # as shouldi's README does
    (out / "shouldi.json").write_text(json.dumps(shouldi.export(linked=True), indent=2, sort_keys=True) + "\n")
    (out / "shouldi-unlinked.json").write_text(json.dumps(shouldi.export(linked=False), indent=2, sort_keys=True)
                                               + "\n")
    semantics = DataFlow(count, square, report)
    semantics.seed += [Input(value=3, definition=n), Input(value=True, definition=ok),
                       Input(value="res", definition=shared)]
    (out / "semantics.json").write_text(json.dumps(semantics.export(linked=True), indent=2, sort_keys=True) + "\n")

    async def go() -> None:
        async for _ctx, _results in run(semantics):
            pass

    asyncio.run(go())
    calls = sorted(CALLS, key=lambda c: json.dumps(c, sort_keys=True))
    (out / "semantics.calls.json").write_text(json.dumps(calls, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
