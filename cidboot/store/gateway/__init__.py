"""The IPFS Trustless Gateway: a server over the block store, and a client that trusts no
gateway (every block is verified against its CID before it is used)."""
