"""IPv4 addresses as the boot stages handle them: dotted quads to and from their 4 bytes, a
prefix length to and from its netmask. As strict as `ipaddress` where the stages relied on it
(four decimal octets 0-255, no leading zeros, no other notation; a netmask must be contiguous:
`ipaddress` would also read "0.0.0.255" as a host mask, a DHCP server sending that is broken).

Why not `ipaddress`: its classes are ~5 M guest instructions to import, in every stage under
TCG, for these four conversions; `urllib.parse` imports it too, but only uses it for a bracketed
IPv6 host, so with the stages' own uses gone cidboot.stage.deferred can leave it unrun.
"""

from __future__ import annotations

_DIGITS = frozenset("0123456789")


def packed(address: str) -> bytes:
    """The 4 bytes of a dotted-quad IPv4 address; ValueError for anything else."""
    parts = address.split(".") if isinstance(address, str) else []
    if len(parts) != 4 or not all(0 < len(p) <= 3 and _DIGITS.issuperset(p) and (p == "0" or p[0] != "0")
                                  and int(p) <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {address!r}")
    return bytes(int(p) for p in parts)


def text(raw: bytes) -> str:
    """The dotted quad of 4 address bytes; ValueError for another length."""
    if len(raw) != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {len(raw)}")
    return ".".join(str(b) for b in raw)


def netmask(prefixlen: int) -> str:
    """The netmask of a prefix length 0-32 (24 -> "255.255.255.0"); ValueError otherwise."""
    if isinstance(prefixlen, bool) or not isinstance(prefixlen, int) or not 0 <= prefixlen <= 32:
        raise ValueError(f"not an IPv4 prefix length: {prefixlen!r}")
    return text(((0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF).to_bytes(4, "big"))


def prefixlen(mask: str | bytes) -> int:
    """The prefix length of a netmask (dotted quad or 4 bytes); ValueError when it is not one
    (not an address, or its one bits not contiguous from the left)."""
    value = int.from_bytes(packed(mask) if isinstance(mask, str) else packed(text(mask)), "big")
    host = ~value & 0xFFFFFFFF
    if host & (host + 1):
        raise ValueError(f"{mask if isinstance(mask, str) else text(mask)} is not a contiguous netmask")
    return 32 - host.bit_length()
