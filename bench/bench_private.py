"""Layer encryption speed: STREAM decryption (cidboot.trust.private.stream, with the plaintext
hash check of keys.decrypt_layer) and encryption, beside SHA-256 over the same bytes (what the
CID verification of those bytes costs), measured in the same run. On the host; the guest number
(the boot path) comes with the bootstrap's decrypt step."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench.common import parse_args, write_results
from cidboot.trust.private import keys, stream


def throughput(fn: Callable[[], object], nbytes: int, seconds: float = 1.0) -> float:
    """MiB/s of `fn`, which processes `nbytes`, over at least `seconds` (the best of 3 rounds)."""
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds / 3:
            fn()
            n += 1
        best = max(best, n * nbytes / dt / (1 << 20))
    return best


def _drain(it: Iterable[bytes]) -> None:
    for _ in it:
        pass


def main() -> int:
    args = parse_args(__doc__ or "", [("--mib", {"type": int, "default": 16, "help": "layer size in MiB"})])
    size = args.mib << 20
    data = os.urandom(size)
    enc = keys.encrypt_layer(os.urandom(32), data, "runtime")
    piece = 256 << 10  # as UnixFS leaves arrive from the gateway client
    pieces = [enc.ciphertext[i:i + piece] for i in range(0, len(enc.ciphertext), piece)]

    def decrypt() -> None:
        for _ in keys.decrypt_layer(enc.key, pieces, sha256=enc.sha256, size=enc.size):
            pass

    ref = throughput(lambda: hashlib.sha256(enc.ciphertext).digest(), len(enc.ciphertext))
    rows: list[dict[str, Any]] = []
    for name, fn, n in (("STREAM decrypt + plaintext SHA-256 (decrypt_layer)", decrypt, len(enc.ciphertext)),
                        ("STREAM decrypt only", lambda: _drain(stream.decrypt_chunks(enc.key, pieces)), len(enc.ciphertext)),
                        ("STREAM encrypt", lambda: _drain(stream.encrypt_chunks(enc.key, [data])), size)):
        mibs = throughput(fn, n)
        rows.append({"operation": name, "MiB_per_s": round(mibs), "reference": "SHA-256 (CID check) of the same bytes",
                     "ref_MiB_per_s": round(ref), "slowdown_vs_ref": round(ref / mibs, 2)})
    write_results(args.out, "private", rows, {"layer_bytes": size, "piece_bytes": piece,
                                             "slowdown_vs_ref": "time per byte / SHA-256's time per byte"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
