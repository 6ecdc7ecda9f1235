"""firmware: the L0 stage: network-boot client, measure the bootstrap, derive CDI_1, kexec."""
