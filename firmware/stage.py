"""The L0 firmware stage, run by /init as PID 1 (docs/boot-chain.md):

1. read CDI_0 + the chain [root, cert L0] from the DICE engine (QEMU fw_cfg `opt/cidboot/dice`);
   without it, refuse and power off: an unmeasured L0 must not pretend to measure anything;
2. NIC up, DHCP as a PXE client (user class "cidboot-firmware"), TFTP: boot.ipxe, then the
   kernel, initrd(s) and boot config it names; not the kernel when the script's hint
   (`#cidboot kernel-sha512=`) names the kernel already running (firmware.netboot.reuses_running_kernel),
   and then not the first initrd either when its hint (`#cidboot runtime-sha512=`) names the
   runtime layer this image runs (firmware.netboot.reuses_running_runtime);
3. measure L1: code_hash = boot_code_hash(kernel, initrds) (cidboot.trust.measure: over the kernel
   and each initrd the script lists; the running kernel's or runtime layer's SHA-512 for one not
   fetched: what runs is what is measured), config descriptor = the boot config bytes, mode
   NORMAL; DICE main flow -> CDI_1 and the L1 certificate;
4. wipe CDI_0 and hand over to L1 (cidboot.stage.switch_root.hand_over): in this kernel when the
   bootstrap's kernel is byte-identical to ours (switch_root into its initramfs, the hand-off
   as files, qemu_fw_cfg unloaded), else kexec with the hand-off appended to its initrd.

Every failure prints one clear console line and powers off.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cidboot.netboot import dhcp_client
from cidboot.stage import events, pid1
from cidboot.stage.console import StageRefused, say, wipe
from cidboot.stage.handoff import Handoff
from firmware import netboot
from firmware.netboot import Fetched, Network, fetch_boot, network_up

FW_CFG_HANDOVER = "/sys/firmware/qemu_fw_cfg/by_name/opt/cidboot/dice/raw"


Refused = StageRefused  # a check failed: `cidboot: refused: <why>`, then power off


def read_engine_handover(path: str | Path = FW_CFG_HANDOVER) -> bytearray | None:
    """The engine's encoded handover (CBOR {1: CDI_Attest_0, 2: CDI_Seal_0, 3: chain}), or None."""
    try:
        return bytearray(Path(path).read_bytes())
    except FileNotFoundError:
        return None


@dataclass
class Measured:
    """L1's code hash and the hand-off carrying CDI_1 and the chain."""

    code_hash: bytes
    handoff: Handoff


def measure_and_derive(engine: bytes | bytearray, fetched: Fetched) -> Measured:
    """L1's DICE inputs from what was fetched, the DICE main flow from CDI_0, and the hand-off for
    L1 (CDI_1 and the chain [root, cert L0, cert L1]). Wipes the decoded CDI_0 copies."""
    from cidboot.trust.dice import (
        DiceInputs,
        DiceMode,
        append_to_chain,
        decode_handover,
        encode_handover,
        main_flow,
    )
    from cidboot.trust.dice.chain import HandoverError
    from cidboot.trust.measure import boot_code_hash_of_parts

    raw = bytes(engine)
    try:
        h = decode_handover(raw)
    except HandoverError as e:
        raise Refused(f"DICE handover from the engine: {e}") from None
    finally:
        wipe(raw)
    # = boot_code_hash(kernel, initrds); the running kernel's and runtime layer's hashes for those not fetched
    code_hash = boot_code_hash_of_parts(fetched.kernel_sha512(), fetched.initrd_sha512s())
    inputs = DiceInputs(code_hash=code_hash, config_value=None, config_descriptor=fetched.bootconfig,
                        mode=DiceMode.NORMAL)
    from cidboot.stage.switch_root import check_probes, debug_build

    probes = check_probes([h.cdi_attest, h.cdi_seal]) if debug_build() else None  # test builds only
    try:
        a1, s1, cert = main_flow(h.cdi_attest, h.cdi_seal, inputs)
    finally:
        wipe(h.cdi_attest)
        wipe(h.cdi_seal)
    chain = append_to_chain(h.chain, cert)
    dice = encode_handover(a1, s1, chain)
    wipe(a1)
    wipe(s1)
    boot: dict[str, object] = {"boot_mode": "measured", "bootconfig": fetched.bootconfig.decode("utf-8", "replace")}
    if probes is not None:
        boot["handover_check"] = probes
    return Measured(code_hash, Handoff(dice=dice, boot=boot))


def run(fw_cfg: str | Path = FW_CFG_HANDOVER, *, kexec: bool = True) -> Measured:
    """All steps; returns instead of kexec-ing when kexec=False (for tests). Raises Refused or
    any CidbootError/OSError on failure (main() turns them into console lines)."""
    t0 = time.monotonic()
    engine = read_engine_handover(fw_cfg)
    if engine is None:
        raise Refused("no DICE handover from the engine")
    say("cidboot-stage: firmware start")
    events.emit("firmware", "start", dice=engine)
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        net: Network = network_up(log=lambda m: print(f"cidboot: firmware: {m}", file=sys.stderr, flush=True))
        timings["net+dhcp"] = time.monotonic() - t
        from cidboot.stage.switch_root import (
            kexec_forced,
            proc_cmdline,
            running_kernel_sha512,
            running_runtime,
        )

        t = time.monotonic()
        # the bootstrap's kernel is not downloaded when the server's hint names the one running, nor then
        # its runtime layer when the hint names the one running
        runtime = running_runtime()
        fetched = fetch_boot(net, running=running_kernel_sha512(), running_cmdline=proc_cmdline(),
                             forced=kexec_forced(), running_runtime=runtime.sha512 if runtime else None)
        timings["tftp"] = time.monotonic() - t
        t = time.monotonic()
        m = measure_and_derive(engine, fetched)
        timings["measure+derive"] = time.monotonic() - t
        # the bootstrap uses this lease when it starts in this kernel (cidboot.netboot.dhcp_client.reusable)
        m.handoff.boot[dhcp_client.HANDOFF_KEY] = dhcp_client.handoff_record(net.lease, net.ifname, net.mac)
    finally:
        wipe(engine)
    detail = " ".join(f"{k}={v:.2f}s" for k, v in timings.items())
    files = " ".join(f"{k}={v:.2f}s" for k, v in fetched.timings.items())
    kernel_note = f"{len(fetched.kernel)}B" if fetched.kernel is not None else "running"
    kernel_note += " runtime=running" if fetched.runtime_skipped else ""
    print(f"cidboot: firmware: ip={net.lease.ip} kernel={kernel_note} initrd={len(fetched.initrd)}B "
          f"{detail} ({files}) total={time.monotonic() - t0:.2f}s", flush=True)
    say(f"cidboot-stage: firmware handover code={m.code_hash.hex()[:16]}")
    events.emit("firmware", "handover", bootconfig=fetched.bootconfig, code=m.code_hash.hex(), ip=net.lease.ip)
    if kexec:  # same kernel: switch_root into the bootstrap's initramfs; else kexec (cidboot.stage.switch_root)
        from cidboot.stage.switch_root import hand_over, hand_over_running

        def log(msg: str) -> None:
            print(f"cidboot: firmware: {msg}", file=sys.stderr, flush=True)

        if fetched.kernel is None:  # the running kernel, by the hint: nothing to hash, nothing to compare
            # and the running runtime, by its hint: kept; fetched (and checked) only for a kexec
            fetch_runtime = (lambda: fetch_measured_runtime(fetched)) if fetched.runtime_skipped else None
            hand_over_running(fetched.initrd, fetched.spec.cmdline, m.handoff, lambda: fetch_measured_kernel(fetched),
                              log=log, runtime=runtime, fetch_runtime=fetch_runtime)
        else:
            hand_over(fetched.kernel, fetched.initrd, fetched.spec.cmdline, m.handoff, forced=kexec_forced(), log=log)
    return m


def fetch_measured_kernel(fetched: Fetched) -> bytes:
    """The bootstrap's kernel over TFTP after all, for a kexec (its initramfs cannot be unpacked
    here). It must be the kernel L1 was measured with, the running one the hint named: a server
    whose hint lied about it is refused, as the measurement would not describe what runs."""
    host, port, path = netboot.tftp_url(fetched.spec.kernel)
    kernel = netboot.tftp_get(host, path, port=port)
    if not hmac.compare_digest(hashlib.sha512(kernel).digest(), fetched.kernel_sha512()):
        raise Refused(f"tftp://{host}/{path}: not the kernel the boot script's hint named and L1 was measured "
                      "with (the running one); refusing to kexec it")
    return kernel


def fetch_measured_runtime(fetched: Fetched) -> bytes:
    """The bootstrap's runtime layer (the script's first initrd) over TFTP after all (a kexec, or a
    running root that cannot stand for it): it must be the one L1 was measured with, the running
    runtime the hint named; a server whose hint lied about it is refused, as for the kernel."""
    host, port, path = netboot.tftp_url(fetched.spec.initrds[0])
    data = netboot.tftp_get(host, path, port=port)
    if fetched.running_runtime is None or not hmac.compare_digest(hashlib.sha512(data).digest(),
                                                                  fetched.running_runtime):
        raise Refused(f"tftp://{host}/{path}: not the runtime layer the boot script's hint named and L1 was "
                      "measured with (the running one); refusing to boot it")
    return data


def main(fw_cfg: str | Path = FW_CFG_HANDOVER) -> None:
    """Entry as PID 1: run, and on any failure print why and power off (never return to /init)."""
    try:
        run(fw_cfg)
        reason = "kexec returned"  # hand_over returns only if kexec_boot does
    except Refused as e:
        say(f"cidboot: refused: {e}")
        events.emit("firmware", "refused", reason=str(e))
        pid1.power_off()
        return
    except Exception as e:  # PID 1: report every failure on the console, then power off
        reason = f"firmware: {type(e).__name__}: {e}"
    events.emit("firmware", "fatal", reason=reason)
    pid1.power_off(reason)
