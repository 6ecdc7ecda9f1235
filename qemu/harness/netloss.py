"""Random packet loss on a link inside a test namespace: tc netem when the kernel has sch_netem,
else a classic-BPF classifier drawing a random number (SKF_AD_RANDOM) whose matches are
redirected by act_mirred to a link that is down, which drops them. (This machine's kernel has
neither netem nor gact, but has cls_bpf + mirred + clsact.)"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

SKF_AD_RANDOM = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: "ld rand" in classic BPF


def _cbpf_loss(percent: int) -> str:
    # A = random; A %= 100; if A >= percent: return 0 (no match) else return -1 (match -> mirred -> dropped)
    prog = [(0x20, 0, 0, SKF_AD_RANDOM), (0x94, 0, 0, 100), (0x35, 1, 0, percent), (0x06, 0, 0, 0xFFFFFFFF),
            (0x06, 0, 0, 0)]
    return ",".join([str(len(prog))] + [f"{c} {jt} {jf} {k}" for c, jt, jf, k in prog])


def add_loss(prefix: Sequence[str], dev: str, percent: int) -> str:
    """Drop `percent` % of the packets `dev` sends; `prefix` runs a command in dev's namespace
    (e.g. ["ip", "netns", "exec", NAME]). Returns the method used ("netem" or "cbpf")."""
    if not 0 < percent < 100:
        raise ValueError(f"loss must be 1..99 %, got {percent}")
    p = list(prefix)
    netem = subprocess.run([*p, "tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", f"{percent}%"],
                           capture_output=True)
    if netem.returncode == 0:
        return "netem"
    hole = f"bh{dev}"[:15]
    subprocess.run([*p, "ip", "link", "add", hole, "type", "veth", "peer", "name", f"{hole[:13]}p"], check=True)
    subprocess.run([*p, "tc", "qdisc", "add", "dev", dev, "clsact"], check=True)
    subprocess.run([*p, "tc", "filter", "add", "dev", dev, "egress", "bpf", "bytecode", _cbpf_loss(percent),
                    "action", "mirred", "egress", "redirect", "dev", hole], check=True)
    return "cbpf"
