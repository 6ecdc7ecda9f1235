"""cidboot shared formats and trust primitives.

Every wire and file format the components exchange lives here exactly once: CIDs and
multiformats, DAG-CBOR, UnixFS/dag-pb, CAR, the block store, the trustless gateway
(server and verifying client), the Kubo backend, COSE, DICE, manifests and EAT evidence.
Components (imagebuilder, bootstrap, firmware, agent, qemu.harness) import from here and
never from each other.
"""

__version__ = "0.1.0"
