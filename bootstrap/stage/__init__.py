"""The L1 bootstrap stage (docs/boot-chain.md): fetch the manifest and image by CID through the
boot config's gateways, verify them against the trust anchor built into this image and the
rollback state in NVRAM, measure the image into CDI_2, and kexec into it.

Modules: `nvram` (rollback state on a raw block device), `tftp_get` (RFC 1350 client for the
unmeasured path), `verify` (fetch + verify + measure -> a boot plan), `main` (PID-1 entry).
Only the stdlib, cbor2 and cryptography are imported: this package runs inside the bootstrap image.
"""
