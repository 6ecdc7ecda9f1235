"""`imagebuilder build --reference NAME=HEX`: reference measurements of the stages below land in
the signed manifest; an image build records the DICE image-layer code hash (layer CIDs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuilder.build import BuildError, _check_references, parse_reference

REPO = Path(__file__).resolve().parents[2]
FW, BS = "ab" * 64, "cd" * 64


def test_parse_reference() -> None:
    assert parse_reference(f"firmware={FW}") == ("firmware", bytes.fromhex(FW))
    for bad, why in ((f"image={FW}", "NAME one of firmware, bootstrap"), ("firmware", "expected NAME=HEX"),
                     ("bootstrap=zz", "not hex"), ("bootstrap=abcd", "64 bytes")):
        with pytest.raises(BuildError, match=why):
            parse_reference(bad)
    with pytest.raises(BuildError, match="measures itself"):
        _check_references("firmware", {"firmware": bytes(64)})


