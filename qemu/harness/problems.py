"""What went wrong in a device's flow, from its audit log: vetoes, refusals and operation errors,
each with the inputs concerned (definition, producer, CID), for report.json and the summary.

The harness reads the agent's audit log by CID through the agent's own gateway (`/ipfs/`), from
the head `/results` names, newest entry first, and decodes each input's provenance node. It
reads; it does not judge: `agent verify-log` checks the chain's signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cidboot.errors import CidbootError
from cidboot.ipld import dagcbor
from cidboot.ipld.cid import CID
from cidboot.trust.cose_key import raw_public_bytes

PROBLEM_DECISIONS = ("veto", "refused", "error")
MAX_ENTRIES = 512  # audit entries walked per device
MAX_PROBLEMS = 64  # problems kept per device (the newest)
MAX_INPUTS = 8  # inputs described per problem


def describe_input(cid: CID, get: Callable[[CID], bytes]) -> dict[str, Any]:
    """An input by its provenance node: definition, producer (raw public key, hex), operation."""
    from cidboot.dataflow.provenance import decode

    out: dict[str, Any] = {"cid": str(cid)}
    try:
        node = decode(get(cid), cid)
    except (CidbootError, KeyError, OSError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out.update({"definition": node.definition, "operation": node.operation or "seed",
                "producer": raw_public_bytes(node.producer_key()).hex()})
    return out


def audit_problems(head: CID | None, get: Callable[[CID], bytes]) -> list[dict[str, Any]]:
    """Vetoes, refusals and errors in the audit log ending at `head`, oldest first."""
    found: list[dict[str, Any]] = []
    cid, walked = head, 0
    while cid is not None and walked < MAX_ENTRIES:
        walked += 1
        try:
            doc = dagcbor.decode(get(cid))
            body = doc["entry"]
        except (CidbootError, KeyError, TypeError, OSError) as e:
            found.append({"decision": "unreadable", "reason": f"audit entry {cid}: {type(e).__name__}: {e}"})
            break
        if body.get("decision") in PROBLEM_DECISIONS and len(found) < MAX_PROBLEMS:
            inputs = [i for i in body.get("inputs") or [] if isinstance(i, CID)]
            found.append({"decision": body["decision"], "operation": body.get("operation"),
                          "reason": body.get("reason"), "entry": str(cid),
                          "inputs": [describe_input(i, get) for i in inputs[:MAX_INPUTS]]})
        prev = body.get("prev")
        cid = prev if isinstance(prev, CID) else None
    return list(reversed(found))


def problem_line(p: dict[str, Any]) -> str:
    """One summary line: `veto: <reason> [input <definition> by <producer> (<operation>) <cid>]`."""
    ins = "; ".join(f"{i.get('definition', '?')} by {str(i.get('producer', '?'))[:16]} ({i.get('operation', '?')}) "
                    f"{i['cid']}" for i in p.get("inputs", []))
    return f"{p['decision']}: {p['reason']}" + (f" [input {ins}]" if ins else "")
