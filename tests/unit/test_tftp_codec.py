"""cidboot.netboot.tftp, the one TFTP codec: round trips, and a precise TftpFormatError for every defect."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.errors import FormatError
from cidboot.netboot import tftp
from cidboot.netboot.tftp import Ack, Data, Error, OAck, Request, TftpFormatError


@pytest.mark.parametrize("p", [
    Request(tftp.RRQ, "bootstrap/vmlinuz", "octet", {"blksize": "1468", "tsize": "0", "windowsize": "16"}),
    Request(tftp.WRQ, "x", "netascii"),
    Data(1, b"abc"), Data(65535, b""), Ack(0), Ack(65535), Error(0, "server busy"), Error(8, ""),
    OAck({"blksize": "1468"}),
])
def test_round_trip(p: tftp.Packet) -> None:
    assert tftp.parse(tftp.encode(p)) == p


def test_helpers_and_options_are_case_insensitive() -> None:
    assert tftp.rrq("f", {"blksize": "8"}) == b"\0\1f\0octet\0blksize\0008\0"
    assert tftp.data(65536 + 3, b"x") == b"\0\3\0\3x" and tftp.ack(65536) == b"\0\4\0\0"
    assert tftp.parse(b"\0\1F\0OCTET\0BlkSize\0008\0") == Request(tftp.RRQ, "F", "octet", {"blksize": "8"})
    assert tftp.error(0, "é" * 300) == b"\0\5\0\0" + b"?" * 200 + b"\0"


@pytest.mark.parametrize("raw, why", [
    (b"", "no opcode"), (b"\1", "no opcode"), (b"\0\x09x", "unknown opcode 9"), (b"\0\0", "unknown opcode 0"),
    (b"\0\1f\0octet", "not NUL-terminated"), (b"\0\1f\0", "no transfer mode"), (b"\0\1\0octet\0", "empty file name"),
    (b"\0\1\xff\0octet\0", "not UTF-8"), (b"\0\1f\0binary\0", "unknown mode"), (b"\0\1f\0oct\xe9t\0", "mode is not ASCII"),
    (b"\0\1f\0octet\0blksize\0", "has no value"), (b"\0\1f\0octet\0\0008\0", "empty option name"),
    (b"\0\1f\0octet\0a\0001\0A\0002\0", "option 'a' repeated"), (b"\0\1f\0octet\0a\0\xff\0", "value is not ASCII"),
    (b"\0\1" + b"f" * 600 + b"\0octet\0", "fits in 512"),
    (b"\0\3\0", "no block number"), (b"\0\4\0\1\0", "ACK of 5 bytes"), (b"\0\4\0", "ACK of 3 bytes"),
    (b"\0\5\0\1", "no message"), (b"\0\5\0\1oops", "not NUL-terminated"), (b"\0\5\0\1a\0b\0", "data after"),
    (b"\0\6", "without options"), (b"\0\6blksize\0", "has no value"),
])
def test_malformed_packets(raw: bytes, why: str) -> None:
    with pytest.raises(TftpFormatError, match=why):
        tftp.parse(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80) | st.sampled_from([1, 2, 3, 4, 5, 6]).flatmap(
    lambda op: st.binary(max_size=60).map(lambda b: bytes([0, op]) + b)))
def test_parse_raises_only_format_errors(raw: bytes) -> None:
    try:
        p = tftp.parse(raw)
    except FormatError:
        return
    if not isinstance(p, Error):  # an ERROR's message is decoded leniently (replacement characters)
        assert tftp.parse(tftp.encode(p)) == p
