"""CIDs, multihash, multibase and varints against known values from the IPFS specs and Kubo."""

import pytest

from cidboot.ipld import multibase, varint
from cidboot.ipld.cid import CID, DAG_CBOR, DAG_PB, RAW, CIDError, CIDMismatch
from cidboot.ipld.multihash import SHA2_256, Multihash, MultihashError

# Known pairs: Kubo prints the v0 form for `ipfs add` of "hello world\n" style content and
# `ipfs cid format -v 1 -b base32` gives the v1 form; the empty raw block and the identity
# probe CID come from the trustless gateway spec.
V0 = "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"
V1 = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
EMPTY_RAW = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def test_v0_v1_round_trip() -> None:
    c = CID.parse(V0)
    assert (c.version, c.codec, c.multihash.code) == (0, DAG_PB, SHA2_256)
    assert str(c) == V0
    assert str(c.to_v1()) == V1
    assert CID.parse(V1) == c.to_v1()
    assert CID.decode(bytes(c)) == c
    assert CID.decode(bytes(c.to_v1())) == c.to_v1()


def test_empty_raw_block_and_identity_probe() -> None:
    assert str(CID.of(b"", RAW)) == EMPTY_RAW
    probe = CID.parse("bafkqaaa")
    assert probe.is_identity and probe.multihash.digest == b""
    probe.verify(b"")


def test_other_bases_parse_to_same_cid() -> None:
    c = CID.parse(V1)
    for base in ("base58btc", "base16", "base32upper", "base64url"):
        assert CID.parse(c.encode(base)) == c


def test_verify_detects_tampering() -> None:
    c = CID.of(b"block", DAG_CBOR)
    c.verify(b"block")
    with pytest.raises(CIDMismatch, match=str(c)):
        c.verify(b"blocK")


@pytest.mark.parametrize(
    "bad, why",
    [
        ("", "empty"),
        ("Qm" + "1" * 44, "CIDv0"),
        ("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMn0", "base58"),
        ("xafybeig", "prefix"),
        ("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzd", "invalid base32"),
        ("bAfybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", "mixed case"),
        ("bciqaaaa", "CIDv0 must be written"),
        ("f0170" + "12" + "20" + "00" * 31, "truncated"),
        ("f02701220" + "00" * 32, "version"),
        ("f01ff011220" + "00" * 32, "codec"),
    ],
)
def test_malformed_cids_are_rejected(bad: str, why: str) -> None:
    with pytest.raises(CIDError, match=why):
        CID.parse(bad)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(CIDError, match="trailing"):
        CID.decode(bytes(CID.parse(V1)) + b"\0")


def test_multihash_length_enforced() -> None:
    with pytest.raises(MultihashError, match="32 bytes"):
        Multihash(SHA2_256, b"\0" * 31)


def test_varint_strict() -> None:
    assert varint.decode(varint.encode(300)) == (300, 2)
    for n in (0, 1, 127, 128, 2**32, 2**63 - 1):
        assert varint.decode(varint.encode(n))[0] == n
    with pytest.raises(varint.VarintError, match="minimally"):
        varint.decode(b"\x81\x00")
    with pytest.raises(varint.VarintError, match="truncated"):
        varint.decode(b"\x80")
    with pytest.raises(varint.VarintError, match="longer"):
        varint.decode(b"\xff" * 10)


def test_multibase_known_values() -> None:
    # From the multibase spec test vectors for "yes mani !".
    data = b"yes mani !"
    assert multibase.encode(data, "base32") == "bpfsxgidnmfxgsibb"
    assert multibase.encode(data, "base58btc") == "z7paNL19xttacUY"
    assert multibase.encode(data, "base16") == "f796573206d616e692021"
    for s in ("bpfsxgidnmfxgsibb", "z7paNL19xttacUY", "f796573206d616e692021", "meWVzIG1hbmkgIQ"):
        assert multibase.decode(s) == data
    with pytest.raises(multibase.MultibaseError, match="unknown multibase prefix"):
        multibase.decode("?abc")
