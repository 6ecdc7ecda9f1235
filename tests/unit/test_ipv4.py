"""cidboot.netboot.ipv4 agrees with `ipaddress` on everything the stages convert, and is at least
as strict (it replaced ipaddress there so that module can stay unrun at start)."""

from __future__ import annotations

import ipaddress

import pytest

from cidboot.netboot import ipv4


def test_prefix_lengths_and_netmasks_round_trip_as_ipaddress_computes_them() -> None:
    for n in range(33):
        mask = str(ipaddress.IPv4Network(f"0.0.0.0/{n}").netmask)
        assert ipv4.netmask(n) == mask
        assert ipv4.prefixlen(mask) == n == ipv4.prefixlen(ipaddress.IPv4Address(mask).packed)


@pytest.mark.parametrize("address", ["0.0.0.0", "10.77.0.10", "192.168.1.255", "255.255.255.255"])
def test_addresses_convert_as_ipaddress_does(address: str) -> None:
    raw = ipaddress.IPv4Address(address).packed
    assert ipv4.packed(address) == raw
    assert ipv4.text(raw) == address


@pytest.mark.parametrize("bad", ["1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.256", " 1.2.3.4", "1.2.3.4\n", "", "a.b.c.d",
                                 "1..3.4", "+1.2.3.4", "1.2.3.-0", "\u00b2.1.1.1", "0x7f.0.0.1", "1.2.3.0000"])
def test_what_is_not_a_dotted_quad_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IPv4 address"):
        ipv4.packed(bad)
    with pytest.raises(ValueError):  # ipaddress refuses each of them too
        ipaddress.IPv4Address(bad)


def test_wrong_lengths_masks_and_prefixes_are_refused() -> None:
    for raw in (b"", b"\x01\x02\x03", b"\x01\x02\x03\x04\x05"):
        with pytest.raises(ValueError, match="4 bytes"):
            ipv4.text(raw)
    for mask in ("255.0.255.0", "0.0.0.255", "255.255.255.1"):  # ipaddress would read 0.0.0.255 as a host mask
        with pytest.raises(ValueError, match="not a contiguous netmask"):
            ipv4.prefixlen(mask)
    for n in (-1, 33, True):
        with pytest.raises(ValueError, match="not an IPv4 prefix length"):
            ipv4.netmask(n)
