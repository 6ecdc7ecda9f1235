"""agent: the L2 appliance: provenance-gated dataflow orchestrator, attestation API, peers."""
