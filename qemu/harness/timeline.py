"""Read a timestamped console into boot stages (the console protocol of docs/boot-chain.md).

Stage durations are derived from the markers each stage prints: firmware runs from power-on
to its handover, the bootstrap from there to its handover, the image from there to
`agent ready`. Refusals, fatal errors and the agent's audit lines (`cidboot: audit: veto|refused|error:`)
are collected with their times.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from qemu.harness.vm import ConsoleLine

STAGE_RX = re.compile(r"cidboot-stage: (?P<stage>[a-z0-9_-]+) (?P<event>[a-z0-9_-]+)(?P<rest>.*)$")
PROBLEM_RX = re.compile(r"cidboot: (?:audit: )?(?P<kind>refused|fatal|veto|error): (?P<reason>.*)$")
FIELD_RX = re.compile(r"(\w+)=(\S+)")
LOG_RX = re.compile(r"^\[\s*(?P<t>\d+(?:\.\d+)?)\] ?(?P<text>.*)$")


@dataclass
class Timeline:
    events: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> event -> t
    fields: dict[str, dict[str, str]] = field(default_factory=dict)  # "stage event" -> k=v
    problems: list[tuple[float, str, str]] = field(default_factory=list)  # (t, kind, reason)

    def stage_seconds(self) -> dict[str, float]:
        """Per-stage wall time from power-on: firmware, bootstrap, image (what is known)."""
        ev = self.events
        marks = [("firmware", 0.0 if "firmware" in ev else None, ev.get("firmware", {}).get("handover")),
                 ("bootstrap", ev.get("firmware", {}).get("handover", 0.0 if "bootstrap" in ev else None),
                  ev.get("bootstrap", {}).get("handover")),
                 ("image", ev.get("bootstrap", {}).get("handover"), ev.get("agent", {}).get("ready"))]
        return {name: round(end - start, 3) for name, start, end in marks if start is not None and end is not None}

    def to_obj(self) -> dict[str, object]:
        return {"events": self.events, "stage_seconds": self.stage_seconds(),
                "problems": [{"t": t, "kind": k, "reason": r} for t, k, r in self.problems]}


def read_log(text: str) -> list[ConsoleLine]:
    """The lines of a recorded console.log ("[   3.214] text"), for timelines after the fact.
    Lines without a stamp (none are written so, but a hand-made sample may have them) keep the
    previous line's time."""
    out: list[ConsoleLine] = []
    for raw in text.splitlines():
        m = LOG_RX.match(raw)
        if m:
            out.append(ConsoleLine(float(m["t"]), m["text"]))
        elif raw:
            out.append(ConsoleLine(out[-1].t if out else 0.0, raw))
    return out


def parse(lines: Iterable[ConsoleLine]) -> Timeline:
    tl = Timeline()
    for line in lines:
        m = STAGE_RX.search(line.text)
        if m:
            tl.events.setdefault(m["stage"], {}).setdefault(m["event"], line.t)
            kv = dict(FIELD_RX.findall(m["rest"]))
            if kv:
                tl.fields[f"{m['stage']} {m['event']}"] = kv
            continue
        p = PROBLEM_RX.search(line.text)
        if p:
            tl.problems.append((line.t, p["kind"], p["reason"].strip()))
    return tl
