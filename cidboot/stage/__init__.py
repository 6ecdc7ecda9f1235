"""What every boot stage does as PID 1: mounts and module loading, the hand-off between stages,
kexec, the cpio writer/reader, the console protocol, wiping secrets.

Guest-side: stdlib plus `cidboot.ipld`/`cidboot.trust`/`cidboot.netboot` only (no host tools;
tests/unit/test_guest_imports.py enforces it).
"""
