"""`agent enrol --roots FILE`: enrol this machine's TPM for TPM-rooted boots (a real server's
factory step, run once on the server on a trusted network; docs/tpm.md, "Enrolment").

Over /dev/tpmrm0 with raw TPM commands (or an swtpm's TCP port, `--swtpm HOST:PORT`): the AK is
made persistent at 0x81010002 (the primary AK of a fixed template; a key already there, e.g. one
tpm2_createak made, is kept), the EK certificate is read from NV 0x01C00002 and, with
`--ek-ca PEM`, checked to be issued by the TPM vendor's CA; make/activate credential (a secret
encrypted to that EK and bound to the AK's name, recovered by TPM2_ActivateCredential) shows the
AK lives in that TPM; only then is the device added to the verifiers' roots file. After the server's first boot from the boot
server, `--baseline EVIDENCE --nonce HEX` records its firmware PCRs (0-3, 5-7) from that boot's
evidence (`curl URL/attestation?nonce=HEX`), once its quote verifies with the enrolled AK.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import UsageError, print_json
from cidboot.errors import CidbootError
from cidboot.trust.appraisal import DeviceRoots
from cidboot.trust.tpm.device import Tpm
from cidboot.trust.tpm.errors import EkCertificateError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enrol", help="enrol this machine's TPM (AK, EK certificate) in a roots file",
                       description=__doc__)
    p.add_argument("--roots", type=Path, required=True, help="the verifiers' device roots file (created if absent)")
    p.add_argument("--name", default="", help="device name")
    p.add_argument("--role", help="the device's role (appraisal compares the role it claims with this)")
    p.add_argument("--tpm", default=None, help="TPM device node (default: /dev/tpmrm0, else /dev/tpm0)")
    p.add_argument("--swtpm", metavar="HOST:PORT", help="an swtpm's TCP data channel instead of a device node")
    p.add_argument("--ek-ca", type=Path, metavar="PEM", help="the TPM vendor's CA: the EK certificate must be issued by it")
    p.add_argument("--baseline", type=Path, metavar="EVIDENCE",
                   help="record the firmware baseline from this evidence (EAT) of a known-good boot; needs --nonce and --device")
    p.add_argument("--nonce", help="with --baseline: the nonce the evidence was asked for (hex)")
    p.add_argument("--device", help="with --baseline: the device id in the roots file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _open(args: argparse.Namespace) -> Tpm:
    from cidboot.trust.tpm import device

    if args.swtpm:
        host, _, port = args.swtpm.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--swtpm must be HOST:PORT, got {args.swtpm!r}")
        return device.Tpm(device.SocketTransport(host, int(port)))
    return device.open_device([args.tpm] if args.tpm else device.DEVICES)


def run(args: argparse.Namespace) -> int:
    from cidboot.trust.tpm.enrol import enrol_device, firmware_baseline, record_baseline

    if args.baseline is not None:
        if not args.nonce or not args.device:
            raise UsageError("--baseline needs --nonce and --device")
        try:
            nonce = bytes.fromhex(args.nonce)
        except ValueError:
            raise UsageError(f"--nonce must be hex, got {args.nonce!r}") from None
        roots = DeviceRoots.load(args.roots)
        if args.device not in roots.tpm:
            raise CidbootError(f"{args.roots}: no TPM device {args.device}")
        baseline = firmware_baseline(args.baseline.read_bytes(), nonce, roots.tpm[args.device])
        dev = record_baseline(args.roots, args.device, baseline)
        out = {"id": args.device, **dev.to_json()}
    else:
        ca = None
        if args.ek_ca is not None:
            from cryptography import x509

            try:
                ca = x509.load_pem_x509_certificate(args.ek_ca.read_bytes())
            except (OSError, ValueError) as e:
                raise UsageError(f"--ek-ca {args.ek_ca}: not a PEM certificate: {e}") from None
        with _open(args) as tpm:
            try:
                dev = enrol_device(tpm, ek_ca=ca)
            except EkCertificateError as e:
                raise CidbootError(f"EK certificate not issued by {args.ek_ca}: {e}" if ca is not None
                                   and "issued by" in str(e) else str(e)) from None
        roots = DeviceRoots.load(args.roots) if args.roots.exists() else DeviceRoots()
        did = roots.add_tpm(dev, args.name, args.role)
        roots.save(args.roots)
        out = {"id": did, **dev.to_json()}
    if args.json:
        print_json(out)
    else:
        pcrs = out.get("firmware_pcrs") or {}
        print(f"device {out['id']}: AK {out['ak_name']}, EK certificate {'yes' if out.get('ek_cert') else 'none'}, "
              f"firmware baseline {'PCRs ' + ','.join(pcrs) if pcrs else 'not yet (--baseline after a first boot)'}")
    return 0


