"""The QEMU test harness: network namespaces, bridges and taps for boot tests, QEMU guests
driven over QMP, and the DICE engine role. (`qemu/` itself is a namespace portion, so the
installed `qemu.qmp` still imports.)"""
