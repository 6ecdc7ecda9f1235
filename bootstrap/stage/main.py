"""The L1 bootstrap stage as PID 1 (docs/boot-chain.md):

1. read the hand-off (cidboot.stage.handoff.load erases dice.cbor at once). With one, the boot is
   measured: CDI_1 + chain from the firmware, the boot config in boot.json. Without one (a plain
   iPXE ROM booted us) the boot is unmeasured: the boot config comes over TFTP from the
   `cidboot.config=tftp://...` on the command line, and CDI_1 is random and ephemeral with a
   one-entry chain, so the image still has an identity whose evidence says "unmeasured";
2. the firmware's DHCP lease after a same-kernel hand-over (cidboot.netboot.dhcp_client.reusable),
   else NIC up + DHCP (user class "cidboot-bootstrap");
3. fetch + verify + measure (bootstrap.stage.verify.prepare), and for a manifest with encrypted
   layers the keys from the key broker and the layers decrypted in RAM (verify.unlock; plaintext
   is never written to persistent storage), rollback state on NVRAM;
4. zero the CDI_1 copies and hand over to the image (cidboot.stage.switch_root.hand_over): in this
   kernel when the image's kernel is byte-identical to ours, else kexec with the hand-off
   appended to its initrd.

Any failure prints `cidboot: refused: <check>: <detail>` and powers off, or, when the boot
config says on_failure=retry, tries again after a pause. Nothing unverified is kexec'ed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bootstrap.stage.nvram import DEFAULT_DEVICE, Nvram
from bootstrap.stage.verify import TRUST_ANCHOR, BootPlan, Refused, load_anchor, prepare, wipe
from cidboot.errors import CidbootError
from cidboot.netboot.bootconfig import BootConfig, BootConfigError
from cidboot.stage import events, pid1
from cidboot.stage.console import say

USER_CLASS = b"cidboot-bootstrap"
RETRY_PAUSE = 10.0  # seconds between attempts when the boot config says on_failure=retry
MAX_BOOTCONFIG = 1 << 20  # a boot config is a few hundred bytes; anything bigger over TFTP is not what we asked for
STORE_DIR = None  # verified blocks stay in this process's memory (MemoryBlockstore); a path: a Blockstore there
# docs/boot-chain.md: dice.cbor is absent for unmeasured boots, and cidboot.stage.handoff enforces it;
# so the ephemeral identity of an unmeasured boot stays here until that contract carries it.
UNMEASURED_CARRIES_DICE = False


def log(msg: str) -> None:
    print(f"cidboot: bootstrap: {msg}", file=sys.stderr, flush=True)


class Start:
    """What the previous stage (or iPXE) gave us. A plain record (a dataclass's generated methods
    cost ~2-3 M guest instructions at the stage's import)."""

    __slots__ = ("boot_mode", "dice", "bootconfig", "ip", "dhcp_config_url", "boot", "tpm", "lease")

    def __init__(self, boot_mode: str, dice: bytearray | None, bootconfig: bytes | None, ip: str | None = None,
                 dhcp_config_url: str | None = None, boot: dict[str, Any] | None = None, tpm: Any = None,
                 lease: dict[str, Any] | None = None) -> None:
        self.boot_mode = boot_mode
        self.dice = dice  # the encoded CDI_1 handover; ephemeral for unmeasured boots
        self.bootconfig = bootconfig  # None: fetch it over TFTP once the network is up
        self.ip = ip  # set once the network is up, so a retry does not redo DHCP
        self.dhcp_config_url = dhcp_config_url  # the boot config the DHCP reply names (for UKIs: no cmdline URL)
        self.boot: dict[str, Any] = {} if boot is None else boot  # the boot.json received (e.g. "handover": "kexec")
        self.tpm = tpm  # bootstrap.stage.tpm.TpmRoot on a TPM-measured boot (UEFI + TPM, no L0)
        self.lease = lease  # this boot's lease, for the image's hand-off (dhcp_client.handoff_record)


def ephemeral_dice() -> bytearray:
    """A random CDI_1 and the one-entry chain [its own public key]: an identity with no
    measurement behind it, for unmeasured boots."""
    from cidboot.trust.dice import CDI_SIZE, encode_chain, encode_handover, key_from_cdi

    attest, seal = os.urandom(CDI_SIZE), os.urandom(CDI_SIZE)
    out = bytearray(encode_handover(attest, seal, encode_chain(key_from_cdi(attest).public_key(), [])))
    wipe(attest)
    wipe(seal)
    return out


TPM_DEVICES = ("/dev/tpmrm0", "/dev/tpm0")  # cidboot.trust.tpm.device.DEVICES (tests/unit/test_bootstrap_stage.py)


def tpm_device_present() -> bool:
    """A TPM device node exists: looked at before `bootstrap.stage.tpm` is imported, whose TPM
    stack (nine modules, ~40 ms under TCG) only a machine with a TPM needs; without one the boot
    is unmeasured whatever the rest of `tpm.available()` would say."""
    return any(os.path.exists(p) for p in TPM_DEVICES)


def read_start(root: str | Path = "/") -> Start:
    from cidboot.stage.handoff import HandoffError, HandoffNotFound, load

    try:
        h = load(root)
    except HandoffNotFound:
        if not tpm_device_present():
            return Start("unmeasured", ephemeral_dice(), None)
        from bootstrap.stage import tpm

        if tpm.available():  # UEFI started us and measured us into the TPM: CDI_1 from the TPM
            dice, tpm_root = tpm.start()
            return Start("measured", dice, None, tpm=tpm_root)
        return Start("unmeasured", ephemeral_dice(), None)
    except HandoffError as e:
        raise Refused("handoff", str(e)) from None
    from cidboot.stage.switch_root import report_handover_check

    report_handover_check(h.boot, "bootstrap", root=str(root))  # debug builds of the firmware only
    cfg = h.boot.get("bootconfig")
    if not isinstance(cfg, str):
        raise Refused("handoff", "boot.json carries no boot config")
    if h.boot["boot_mode"] == "unmeasured":
        return Start("unmeasured", ephemeral_dice(), cfg.encode(), boot=h.boot)
    dice = bytearray(h.dice or b"")
    if h.dice is not None:
        wipe(h.dice)  # the loaded copy; `dice` is the one main() zeroes before the hand-over
    return Start("measured", dice, cfg.encode(), boot=h.boot)


def config_url(cmdline: str) -> str | None:
    for arg in cmdline.split():
        if arg.startswith("cidboot.config="):
            return arg.split("=", 1)[1]
    return None


def dhcp_config_url(next_server: str, boot_file: str, mac: str) -> str | None:
    """The boot config URL a DHCP reply gives the bootstrap: its boot file when that is a
    `bootconfig/*.json` path, else the well-known tftp://<siaddr>/bootconfig/<mac>.json; None
    without a next server."""
    if next_server in ("", "0.0.0.0"):
        return None
    path = boot_file.lstrip("/")
    if not (path.startswith("bootconfig/") and path.endswith(".json") and ".." not in path):
        path = f"bootconfig/{mac.lower().replace(':', '-')}.json"
    return f"tftp://{next_server}/{path}"


def network_up(start: Start) -> tuple[str, str | None]:
    """The NIC's address: the firmware's lease after a same-kernel hand-over (boot.json "lease",
    dhcp_client.reusable), else NIC up, DHCP lease, address configured. Returns the address (for
    the log) and the boot config URL the reply names (dhcp_config_url); keeps the lease in
    `start.lease` for the image's hand-off."""
    from cidboot.netboot import dhcp_client

    # not a PXE client any more (no vendor class/arch): the server answers user class
    # cidboot-bootstrap with the path of this device's boot config as boot file
    name, mac, lease = dhcp_client.network_up(user_class=USER_CLASS, handed=start.boot.get(dhcp_client.HANDOFF_KEY),
                                              log=log)
    start.lease = dhcp_client.handoff_record(lease, name, mac)
    return lease.ip, dhcp_config_url(lease.next_server, lease.boot_file, mac)


def fetch_bootconfig(cmdline_path: str | Path = "/proc/cmdline", dhcp_url: str | None = None) -> bytes:
    """From `cidboot.config=` on the command line (iPXE puts it there), else from the URL the
    DHCP reply named (a UKI's command line has none)."""
    from cidboot.netboot.tftp_client import TftpError, get_url

    url = config_url(Path(cmdline_path).read_text()) or dhcp_url
    if url is None:
        raise Refused("bootconfig", "no hand-off, no cidboot.config=tftp://... on the kernel command line "
                                    "and no boot server named in the DHCP reply")
    log(f"bootconfig={url}")
    try:
        return get_url(url, max_size=MAX_BOOTCONFIG)
    except TftpError as e:
        raise Refused("bootconfig", str(e)) from None


def attempt(start: Start, *, anchor_path: str | Path, nvram_path: str | Path, store_dir: str | Path | None,
            cmdline_path: str | Path, network: bool = True, now: int | None = None) -> tuple[BootPlan, BootConfig]:
    """One try: network, boot config, prepare. Raises Refused (or any CidbootError/OSError)."""
    from bootstrap.stage.verify import running_kernel_cid, running_kernel_sha256
    from cidboot.stage.switch_root import kexec_forced, proc_cmdline, running_runtime
    from cidboot.store.blockstore import Blockstore, MemoryBlockstore

    anchor = load_anchor(anchor_path)
    if network and start.ip is None:
        start.ip, start.dhcp_config_url = network_up(start)
        log(f"ip={start.ip}")
    raw = start.bootconfig if start.bootconfig is not None else fetch_bootconfig(cmdline_path, start.dhcp_config_url)
    start.bootconfig = raw  # a retry does not fetch it again
    events.learn_bootconfig(raw)  # a UEFI start: the queued start event (and what follows) can be posted now
    try:
        cfg = BootConfig.decode(raw)
    except BootConfigError as e:
        raise Refused("bootconfig", str(e)) from None
    carry = start.boot_mode == "measured" or UNMEASURED_CARRIES_DICE
    dice = bytes(start.dice) if start.dice is not None else None
    nvram = Nvram(nvram_path)
    store = MemoryBlockstore() if store_dir is None else Blockstore(store_dir)
    forced = kexec_forced(start.boot, cmdline_path)
    running = None if forced else running_kernel_cid()
    running_sha256 = None if forced else running_kernel_sha256()
    try:
        plan = prepare(cfg, raw, dice, boot_mode=start.boot_mode, anchor=anchor, nvram=nvram,
                       store=store, now=now, carry_dice=carry, running_kernel=running,
                       running_cmdline=proc_cmdline(cmdline_path), running_kernel_sha256=running_sha256,
                       running_runtime=None if forced else running_runtime(),
                       device_id=start.tpm.device_id if start.tpm is not None else None, tpm=start.tpm)
    finally:
        if dice is not None:
            wipe(dice)  # this copy of CDI_1; start.dice stays for a retry until main wipes it
        for note in nvram.notes:  # a damaged slot beside a valid one (a torn write): boot, but say so
            log(f"nvram: {note}")
    # last: PCR 15 gets the manifest and layers only once all verified (a private image's got them
    # in prepare, before its key request, whose quote must cover them)
    if start.tpm is not None and "tpm" not in plan.handoff.boot:
        from bootstrap.stage import tpm

        plan.handoff.boot["tpm"] = tpm.measure(start.tpm, plan.manifest_cid, plan.manifest)
    return plan, cfg


def main(*, root: str | Path = "/", anchor_path: str | Path = TRUST_ANCHOR, nvram_path: str | Path = DEFAULT_DEVICE,
         store_dir: str | Path | None = STORE_DIR, cmdline_path: str | Path = "/proc/cmdline") -> None:
    """Entry as PID 1: never returns to /init except by powering off."""
    t0 = time.monotonic()
    try:
        start = read_start(root)
    except Exception as e:  # fail closed with the console line, whatever broke
        say(f"cidboot: refused: {describe(e)}")
        events.emit("bootstrap", "refused", reason=describe(e), check=getattr(e, "check", None))
        pid1.power_off()
        return
    say(f"cidboot-stage: bootstrap start mode={start.boot_mode}" + (" root=tpm" if start.tpm is not None else ""))
    ident = None
    if start.tpm is not None and start.tpm.key_binding is not None and start.dice:  # the AK vouches for L1's key
        ident = events.identity_from_dice(start.dice)
        if ident is not None:
            ident.tpm = start.tpm.key_binding
    events.emit("bootstrap", "start", dice=start.dice if start.boot_mode == "measured" else None, identity=ident,
                bootconfig=start.bootconfig, mode=start.boot_mode,
                firmware="uefi" if Path(root, "sys/firmware/efi").is_dir() else "bios")  # the fleet view's firmware kind
    while True:
        try:
            plan, cfg = attempt(start, anchor_path=anchor_path, nvram_path=nvram_path, store_dir=store_dir,
                              cmdline_path=cmdline_path)
        except Exception as e:  # any failure is a refusal: nothing unverified is kexec'ed
            say(f"cidboot: refused: {describe(e)}")
            events.emit("bootstrap", "refused", bootconfig=start.bootconfig, reason=describe(e), check=getattr(e, "check", None))
            if start.bootconfig is not None and _on_failure(start.bootconfig) == "retry":
                if start.tpm is not None and start.tpm.extended:  # PCR 15 holds this try's events
                    log(f"rebooting in {RETRY_PAUSE:.0f} s to try again (on_failure=retry; PCR 15 is "
                        f"extended once per power-on)")
                    time.sleep(RETRY_PAUSE)
                    if start.dice is not None:
                        wipe(start.dice)
                    pid1.power_off(restart=True)
                    return
                log(f"retrying in {RETRY_PAUSE:.0f} s (on_failure=retry)")
                time.sleep(RETRY_PAUSE)
                continue
            if start.dice is not None:
                wipe(start.dice)
            pid1.power_off()
            return
        break
    timings = " ".join(f"{k}={v:.2f}s" for k, v in plan.timings.items())
    kernel_note = f"{len(plan.kernel)}B" if plan.kernel is not None else "running"
    runtime_note = " runtime=running" if plan.runtime_cid is not None else ""
    log(f"manifest={plan.manifest_cid} {plan.manifest.name} v{plan.manifest.version} kernel={kernel_note}{runtime_note} "
        f"initrd={len(plan.initrd)}B {timings} total={time.monotonic() - t0:.2f}s")
    if plan.unlocked is not None:  # a private image: keys from the broker, layers decrypted in RAM
        say(f"cidboot-stage: bootstrap keys {plan.unlocked.line()}")
    say(f"cidboot-stage: bootstrap handover manifest={plan.manifest_cid}")
    events.emit("bootstrap", "handover", manifest=plan.manifest_cid, name=plan.manifest.name, version=plan.manifest.version)
    from cidboot.stage.switch_root import check_probes, debug_build, hand_over, kexec_forced, kexec_hand_over

    if debug_build() and start.dice is not None and start.boot_mode == "measured":  # test builds only
        from cidboot.trust.dice import decode_handover

        h = decode_handover(bytes(start.dice))
        plan.handoff.boot["handover_check"] = check_probes([h.cdi_attest, h.cdi_seal])
        wipe(h.cdi_attest)
        wipe(h.cdi_seal)
    if start.dice is not None:
        wipe(start.dice)  # CDI_1: the image gets only CDI_2, inside the hand-off
    if start.lease is not None:  # the image's agent uses it when it starts in this kernel
        from cidboot.netboot.dhcp_client import HANDOFF_KEY

        plan.handoff.boot[HANDOFF_KEY] = start.lease
    # same kernel: switch_root into the image's initramfs; a different one (or forced): kexec
    try:
        if plan.kernel is None:  # the running kernel (by CID): not fetched, so switch_root needs no hash of it
            # returns only when the initramfs cannot be unpacked here: straight to kexec then (hand_over
            # would hash the kernel, decide on switch_root again and parse the same initramfs again)
            kernel = same_kernel(plan, cfg)  # plan.initrd is the whole initramfs from here
            kexec_hand_over(kernel, plan.initrd, plan.cmdline, plan.handoff)
        else:
            hand_over(plan.kernel, plan.initrd, plan.cmdline, plan.handoff, forced=kexec_forced(start.boot), log=log)
        reason = "kexec returned"  # both return only if kexec_boot does
    except CidbootError as e:
        reason = f"bootstrap: {e}"
    events.emit("bootstrap", "fatal", reason=reason)
    pid1.power_off(reason)


def same_kernel(plan: BootPlan, cfg: BootConfig) -> bytes:
    """Hand over in the running kernel, whose bytes were not fetched (verify.reuses_running_kernel),
    keeping the running runtime (cidboot.stage.switch_root.try_switch_root; its layer left
    unfetched too when verify.reuses_running_runtime held). Returns only when the image's
    initramfs cannot be unpacked here (a compression this stage cannot read): then with the
    kernel layer's bytes, fetched and verified now (an encrypted layer also decrypted with the key
    kept for this, and checked against its plaintext hash), for a kexec; `plan.initrd` is then the
    whole initramfs (an unfetched runtime layer fetched and checked the same way)."""
    from bootstrap.stage.verify import fetch_left_out
    from cidboot.stage.switch_root import try_switch_root

    rt = plan.runtime_cid
    fetch_runtime = None if rt is None else (lambda: fetch_left_out(plan.manifest, rt, cfg.gateways, plan.runtime_key))
    plan.initrd = try_switch_root(plan.initrd, plan.handoff, log=log, fetch_runtime=fetch_runtime)
    plan.runtime_cid = None  # `initrd` is whole now
    log("kexec instead: fetching the kernel layer")
    assert plan.kernel_cid is not None
    return fetch_left_out(plan.manifest, plan.kernel_cid, cfg.gateways, plan.kernel_key)


def describe(e: Exception) -> str:
    """`<check>: <detail>` for the console line: a Refused says it itself; NIC and DHCP failures
    are the "network" check; anything else the stage could not do is "bootstrap"."""
    if isinstance(e, Refused):
        return str(e)
    check = "network" if type(e).__module__ in ("cidboot.netboot.netif", "cidboot.netboot.dhcp_client") else "bootstrap"
    return f"{check}: {type(e).__name__}: {e}"


def _on_failure(raw: bytes) -> str:
    try:
        return BootConfig.decode(raw).on_failure
    except BootConfigError:
        return "poweroff"
