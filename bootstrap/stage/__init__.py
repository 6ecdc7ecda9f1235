"""The L1 bootstrap stage (docs/boot-chain.md): fetch the manifest and image by CID through the
boot config's gateways, verify them against the trust anchor built into this image and the
rollback state in NVRAM, measure the image into CDI_2, and kexec into it.

Modules: `nvram` (rollback state on a raw block device), `verify` (fetch + verify + measure ->
a boot plan), `main` (PID-1 entry; the unmeasured path reads its boot config with
cidboot.netboot.tftp_client, the firmware's TFTP client).
Only the stdlib, cbor2 and cryptography are imported: this package runs inside the bootstrap image.
"""
