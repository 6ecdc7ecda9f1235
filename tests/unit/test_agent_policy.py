"""Policies ("strategic plans"): the schema's shape, what each key selects, `unless`, and
fail-closed on a malformed rule."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy import RunContext, veto_reason

IMG, OTHER = b"\x11" * 64, b"\x22" * 64


def ctx(**kw: Any) -> RunContext:
    base: dict[str, Any] = {"operation": "hello", "definitions": ["name"], "producer_roles": ["seed"],
                            "measurements": {"image": IMG}, "references": {"image": IMG}}
    return RunContext(**{**base, **kw})


@pytest.mark.parametrize("veto, hit", [
    ({"operation": "hello"}, True),
    ({"operation": "bye"}, False),
    ({"definition": "name"}, True),
    ({"definition": "total"}, False),
    ({"producer": "seed"}, True),
    ({"producer": "sensor"}, False),
    ({"operation": "hello", "producer": "sensor"}, False),  # every key must match
    ({"measurement": "image"}, False),  # measured as the manifest says: no veto
    ({"measurement": "firmware"}, True),  # no firmware measurement at all: veto
])
def test_veto_selectors(veto: dict[str, str], hit: bool) -> None:
    why = veto_reason([{"name": "p", "veto": veto}], ctx())
    assert (why is not None) == hit
    if hit:
        assert why is not None and why.startswith("policy p vetoes hello")


def test_veto_on_a_measurement_that_differs() -> None:
    why = veto_reason([{"name": "p", "veto": {"measurement": "image"}}], ctx(references={"image": OTHER}))
    assert why == "policy p vetoes hello: image is not measured as the manifest says"


def test_unless_measurement_and_equals() -> None:
    p = {"name": "only-measured", "veto": {"operation": "hello"}, "unless": {"measurement": "image"}}
    assert veto_reason([p], ctx()) is None
    assert "image is not measured as the manifest says" in str(veto_reason([p], ctx(references={"image": OTHER})))
    eq = {**p, "unless": {"measurement": "image", "equals": IMG.hex()}}
    assert veto_reason([eq], ctx(references={})) is None
    assert veto_reason([{**p, "unless": {"measurement": "image", "equals": OTHER.hex()}}], ctx()) is not None


@pytest.mark.parametrize("policy", [
    "not a map",
    {"name": "x"},
    {"name": "x", "veto": {}},
    {"name": "x", "veto": {"operaton": "hello"}},
    {"name": "x", "veto": {"operation": 3}},
    {"name": "x", "veto": {"operation": "bye"}, "unless": {"equals": IMG.hex()}},
    {"name": "x", "veto": {"operation": "bye"}, "unless": {"measurement": "image", "equals": "zz"}},
    {"name": "x", "veto": {"operation": "bye"}, "also": 1},
])
def test_malformed_policy_vetoes_everything(policy: Any) -> None:
    why = veto_reason([policy], ctx(operation="anything"))
    assert why is not None and "malformed, so it vetoes everything" in why


def test_first_veto_wins_and_no_policies_pass() -> None:
    assert veto_reason([], ctx()) is None
    ps = [{"name": "a", "veto": {"operation": "bye"}}, {"name": "b", "veto": {"definition": "name"}},
          {"name": "c", "veto": {"operation": "hello"}}]
    assert str(veto_reason(ps, ctx())).startswith("policy b ")
