"""COSE and DICE speed: COSE_Sign1 sign/verify (Ed25519, ES256) and chain verification, each
beside the bare `cryptography` operation it wraps, measured in the same run; the ratio is the
cost of COSE's strict parsing and Sig_structure encoding on top of the signature itself."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bench.common import parse_args, write_results
from cidboot.trust import cose
from cidboot.trust.dice import DiceInputs, encode_chain, key_from_cdi, main_flow, verify_chain


def rate(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """Operations per second over at least `seconds`."""
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        fn()
        n += 1
    return n / dt


def row(operation: str, ops: float, reference: str, ref_ops: float) -> dict[str, Any]:
    return {"operation": operation, "ops_per_s": round(ops), "us_per_op": round(1e6 / ops, 1),
            "reference": reference, "ref_ops_per_s": round(ref_ops), "slowdown_vs_ref": round(ref_ops / ops, 2)}


def bench_sign1(name: str, key: cose.PrivateKey, msg: bytes) -> list[dict[str, Any]]:
    """COSE_Sign1 sign and verify of `msg` beside the bare signature operations on the same bytes."""
    pub = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        edkey = key
        bare_sig = edkey.sign(msg)
        ref_sign = rate(lambda: edkey.sign(msg))
        edpub = edkey.public_key()
        ref_verify = rate(lambda: edpub.verify(bare_sig, msg))
    else:
        eckey, algo = key, ec.ECDSA(hashes.SHA256())
        bare_sig = eckey.sign(msg, algo)
        ref_sign = rate(lambda: eckey.sign(msg, algo))
        ecpub = eckey.public_key()
        ref_verify = rate(lambda: ecpub.verify(bare_sig, msg, algo))
    s1 = cose.sign1(msg, key)
    return [row(f"{name} COSE_Sign1 sign", rate(lambda: cose.sign1(msg, key)), f"bare {name} sign", ref_sign),
            row(f"{name} COSE_Sign1 verify (parse + verify)", rate(lambda: cose.verify1_attached(s1, pub)),
                f"bare {name} verify", ref_verify)]


def main() -> int:
    args = parse_args(__doc__ or "")
    msg = os.urandom(512)
    ed = ed25519.Ed25519PrivateKey.generate()
    rows = bench_sign1("Ed25519", ed, msg) + bench_sign1("ES256", ec.generate_private_key(ec.SECP256R1()), msg)
    edpub, edsig = ed.public_key(), ed.sign(msg)
    ref = rate(lambda: edpub.verify(edsig, msg))
    uds = os.urandom(32)
    attest, seal, certs = uds, uds, []
    for i in range(3):
        attest, seal, cert = main_flow(attest, seal, DiceInputs(code_hash=bytes([i]) * 64, profile_name="cidboot.1"))
        certs.append(cert)
    chain = encode_chain(key_from_cdi(uds).public_key(), certs)
    assert len(verify_chain(chain).entries) == 3
    rows.append(row("DICE main_flow, one Ed25519 layer", rate(lambda: main_flow(attest, seal, DiceInputs())),
                    "bare Ed25519 verify", ref))
    rows.append(row("verify_chain, 3 Ed25519 layers", rate(lambda: verify_chain(chain)),
                    "3 bare Ed25519 verifies", ref / 3))
    write_results(args.out, "cose", rows, {"slowdown_vs_ref": "time of one operation / time of its bare reference",
                                          "message_bytes": len(msg)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
