"""Getting onto the network and fetching a stage: the DHCP/PXE codec and client, TFTP, NIC set-up
(sysfs + ioctls), and the per-device boot config.

Guest-side: imports only the stdlib and `cidboot.errors`/`cidboot.ipld` (no scapy, pyroute2,
tftpy or ipfshttpclient: the minimal images do not carry them; tests/unit/test_guest_imports.py
enforces it). The boot server's DHCP and TFTP servers use the same codecs.
"""
