"""bootstrap: the L1 stage (fetch by CID, verify, measure, hand over) and the boot server
(`bootstrap serve`: DHCP/ProxyDHCP, TFTP, trustless HTTP gateway) that serves it."""
