"""Policies ("strategic plans"): manifest rules that veto an operation before it runs.

    {name: only-measured-images-greet, veto: {operation: hello}, unless: {measurement: image}}

`veto` selects runs (all given keys must match): `operation` (name), `definition` (one of the
inputs has it), `producer` (one input was produced on that role of the placement, or "seed"
for the flow authority's seeds), `measurement: LAYER` (this agent's own LAYER measurement
differs from the manifest's reference value for it, or either is missing). `unless` lifts the
veto: `measurement: LAYER` holds when this agent's own DICE chain measured LAYER and the value
equals the reference the signed manifest carries for it, or, with `equals: HEX` (sha512 hex,
the schema's form), equals that value instead.

What a well-formed policy is, is decided by one function, `cidboot.dataflow.checks.policy_problems`,
which `imagebuilder lock|build` and `agent run` also validate with, so what the builder
signs is exactly what is enforced here. A policy with a problem is itself a veto of
everything (fail closed), with the reason: a typo in a security rule must never turn it off.
Given the flow's `scope` (its operations, definitions and placement roles, which the
orchestrator always passes), that includes a rule naming an operation, definition or
producer that does not exist (it could never match: `producer: hello`, an operation, is not a
role); without a scope only the shape is checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cidboot.dataflow.checks import UNLESS_KEYS, VETO_KEYS, PolicyScope, policy_problems

__all__ = ["UNLESS_KEYS", "VETO_KEYS", "PolicyScope", "RunContext", "veto_reason"]


@dataclass(frozen=True)
class RunContext:
    operation: str
    definitions: Sequence[str]  # of the inputs
    producer_roles: Sequence[str]  # "seed" for authority inputs
    measurements: Mapping[str, bytes]  # this agent's own (from its DICE chain)
    references: Mapping[str, bytes]  # the manifest's reference values
    scope: PolicyScope | None = None  # the flow's names: policies naming anything else veto everything


def _matches(veto: Mapping[str, Any], ctx: RunContext) -> bool:
    if "operation" in veto and veto["operation"] != ctx.operation:
        return False
    if "definition" in veto and veto["definition"] not in ctx.definitions:
        return False
    if "producer" in veto and veto["producer"] not in ctx.producer_roles:
        return False
    return not ("measurement" in veto and _measured_as(ctx, str(veto["measurement"]), None))


def _measured_as(ctx: RunContext, layer: str, equals: str | None) -> bool:
    own = ctx.measurements.get(layer)
    ref = bytes.fromhex(equals) if equals is not None else ctx.references.get(layer)
    return own is not None and ref is not None and own == ref


def _lifted(unless: Mapping[str, Any], ctx: RunContext) -> bool:
    layer = unless.get("measurement")
    if layer is None:
        return False
    return _measured_as(ctx, str(layer), unless.get("equals"))


def veto_reason(policies: Sequence[Mapping[str, Any]], ctx: RunContext) -> str | None:
    """The first policy that vetoes this run, as a reason; None when every policy passes."""
    for i, p in enumerate(policies):
        name = p.get("name", f"policy {i}") if isinstance(p, Mapping) else f"policy {i}"
        problems = policy_problems(p, ("policies", i), ctx.scope)
        if problems:
            return (f"policy {name}: malformed, so it vetoes everything ({'; '.join(map(str, problems))}; "
                    f"veto: a non-empty map of {sorted(VETO_KEYS)}; unless: {sorted(UNLESS_KEYS)}, equals a sha512 hex)")
        veto, unless = p["veto"], p.get("unless", {})
        if _matches(veto, ctx) and not _lifted(unless, ctx):
            why = ""
            if "measurement" in veto:
                why = f": {veto['measurement']} is not measured as the manifest says"
            if unless:
                what = f"{unless['equals'][:16]}..." if "equals" in unless else "the manifest says"
                why += f" and {unless['measurement']} is not measured as {what}"
            return f"policy {name} vetoes {ctx.operation}{why}"
    return None
