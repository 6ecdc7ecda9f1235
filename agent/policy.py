"""Policies ("strategic plans"): manifest rules that veto an operation before it runs.

    {name: only-measured-images-greet, veto: {operation: hello}, unless: {measurement: image}}

`veto` selects runs (all given keys must match): `operation` (name), `definition` (one of the
inputs has it), `producer` (one input was produced on that role; "seed" for the authority).
`unless` lifts the veto: `measurement: LAYER` holds when this agent's own DICE chain measured
LAYER and the value equals the reference the signed manifest carries for it. A policy that
does not parse is itself a veto of everything (fail closed), with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

VETO_KEYS = frozenset({"operation", "definition", "producer"})
UNLESS_KEYS = frozenset({"measurement"})


@dataclass(frozen=True)
class RunContext:
    operation: str
    definitions: Sequence[str]  # of the inputs
    producer_roles: Sequence[str]  # "seed" for authority inputs
    measurements: Mapping[str, bytes]  # this agent's own (from its DICE chain)
    references: Mapping[str, bytes]  # the manifest's reference values


def _matches(veto: Mapping[str, Any], ctx: RunContext) -> bool:
    if "operation" in veto and veto["operation"] != ctx.operation:
        return False
    if "definition" in veto and veto["definition"] not in ctx.definitions:
        return False
    return not ("producer" in veto and veto["producer"] not in ctx.producer_roles)


def _lifted(unless: Mapping[str, Any], ctx: RunContext) -> bool:
    layer = unless.get("measurement")
    if layer is None:
        return False
    own, ref = ctx.measurements.get(str(layer)), ctx.references.get(str(layer))
    return own is not None and ref is not None and own == ref


def veto_reason(policies: Sequence[Mapping[str, Any]], ctx: RunContext) -> str | None:
    """The first policy that vetoes this run, as a reason; None when every policy passes."""
    for i, p in enumerate(policies):
        name = p.get("name", f"policy {i}") if isinstance(p, Mapping) else f"policy {i}"
        veto, unless = (p.get("veto"), p.get("unless", {})) if isinstance(p, Mapping) else (None, None)
        if not isinstance(veto, Mapping) or not veto or set(veto) - VETO_KEYS or not isinstance(unless, Mapping) \
                or set(unless) - UNLESS_KEYS:
            return f"policy {name}: malformed (veto keys {sorted(VETO_KEYS)}, unless keys {sorted(UNLESS_KEYS)})"
        if _matches(veto, ctx) and not _lifted(unless, ctx):
            why = f" and {unless['measurement']} is not measured as the manifest says" if unless else ""
            return f"policy {name} vetoes {ctx.operation}{why}"
    return None
