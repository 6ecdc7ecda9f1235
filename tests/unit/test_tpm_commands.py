"""The guest's TPM command marshalling (cidboot.trust.tpm.commands): known bytes, the PolicyPCR
digest by the spec's formula, and every response parser refusing garbage with TpmResponseError
(a TPM, or whatever sits on /dev/tpmrm0, is input too). The swtpm integration test
(tests/integration/test_tpm_device_integration.py) shows a real TPM accepts these commands."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cidboot.trust.tpm import commands as c
from cidboot.trust.tpm.commands import TpmResponseError

PARSERS = [c.parse_create_primary, c.parse_quote, c.parse_read_public, c.parse_pcr_read, c.parse_start_session,
           c.parse_hmac, c.parse_nv_read, c.parse_nv_size]


def test_create_primary_ak_is_the_probe_command() -> None:
    """The bytes the e2e probe and the factory send (TPM2_CreatePrimary(endorsement, AK_TEMPLATE))."""
    cmd = c.create_primary_ak()
    assert cmd[:10] == struct.pack(">HII", 0x8002, len(cmd), 0x131)
    assert cmd[10:14] == bytes.fromhex("4000000b") and c.AK_TEMPLATE in cmd
    assert cmd.endswith(bytes.fromhex("0000" "00000000"))


def test_policy_pcr_digest_is_the_spec_formula() -> None:
    pcrs = {4: b"\x04" * 32, 15: bytes(32), 11: b"\x0b" * 32}
    values = hashlib.sha256(b"\x04" * 32 + b"\x0b" * 32 + bytes(32)).digest()
    sel = struct.pack(">IHB", 1, 0x000B, 3) + bytes([0x10, 0x88, 0x00])  # PCR 4; 11 and 15
    assert c.policy_pcr_digest(pcrs) == hashlib.sha256(bytes(32) + bytes.fromhex("0000017f") + sel + values).digest()


def test_the_cdi_key_can_only_be_used_through_its_policy() -> None:
    t = c.cdi_key_template(bytes(32))
    (attrs,) = struct.unpack_from(">I", t, 4)
    assert not attrs & c.USER_WITH_AUTH and attrs & c.ADMIN_WITH_POLICY
    assert attrs & c.FIXED_TPM and attrs & c.FIXED_PARENT and attrs & c.SENSITIVE_DATA_ORIGIN


def test_a_refusal_carries_the_tpm_rc() -> None:
    with pytest.raises(TpmResponseError) as e:
        c.parse_quote(struct.pack(">HII", 0x8001, 10, 0x99D))
    assert e.value.rc == 0x99D


def test_an_nv_public_whose_policy_runs_past_it_is_refused() -> None:
    public = struct.pack(">IHIH", 0x01C00002, 0x000B, 0, 200) + bytes(2)
    body = struct.pack(">H", len(public)) + public + struct.pack(">H", 0)
    with pytest.raises(TpmResponseError, match="authPolicy"):
        c.parse_nv_size(struct.pack(">HII", 0x8001, 10 + len(body), 0) + body)


@pytest.mark.parametrize("parser", PARSERS)
def test_truncated_responses_are_refused(parser: object) -> None:
    good = struct.pack(">HII", 0x8002, 10, 0)
    for n in range(len(good)):
        with pytest.raises(TpmResponseError):
            parser(good[:n])  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PARSERS), st.sampled_from([0x8001, 0x8002]), st.binary(max_size=200))
def test_fuzz_parsers_raise_only_tpm_response_error(parser: object, tag: int, body: bytes) -> None:
    resp = struct.pack(">HII", tag, 10 + len(body), 0) + body
    try:
        parser(resp)  # type: ignore[operator]
    except TpmResponseError:
        pass
