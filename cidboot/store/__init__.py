"""Where blocks live and how they move: the flatfs block store, the trustless gateway (server and
verifying client), the Kubo RPC backend.

Built on `cidboot.ipld`; every block that enters a store or leaves a client is verified against its
CID. `kubo` (ipfshttpclient) is host-side only and is never imported by the guest stages.
"""
