"""`python -m qemu.harness enrol DEVICE_DIR --roots FILE`: the factory step for a QEMU TPM device."""

from __future__ import annotations

import argparse
from pathlib import Path

from cidboot.cli import print_json
from cidboot.errors import CidbootError
from qemu.harness import tpm


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enrol", help="manufacture a QEMU device's TPM and enrol its AK in a roots file",
                       description="Manufacture the device's swtpm (EK certificate from a local CA under "
                                   "DEVICE_DIR/tpm, once), make its AK persistent at 0x81010002, check the EK "
                                   "certificate against that CA and add the device (AK, EK certificate) to the "
                                   "verifiers' roots file. The firmware PCR baseline is recorded from the "
                                   "device's first boot (`boot --tpm`). A real server: docs/tpm.md, 'Enrolment'.")
    p.add_argument("device_dir", type=Path, help="the device's state dir (its TPM state goes in DEVICE_DIR/tpm)")
    p.add_argument("--roots", type=Path, required=True, help="the verifiers' device roots file (created if absent)")
    p.add_argument("--name", help="device name (default: the dir's name)")
    p.add_argument("--role", help="the device's role (appraisal compares the role it claims with this)")
    p.add_argument("--json", action="store_true", help="print the enrolment as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = tpm.missing()
    if missing:
        raise CidbootError(f"enrol: {missing}")
    name = args.name or args.device_dir.resolve().name
    roots = tpm.register([tpm.base(args.device_dir)], [name], args.roots, [args.role])
    did = next(d for d in roots.tpm if roots.names.get(d) == name)
    out = {"id": did, "name": name, "role": args.role, **roots.tpm[did].to_json()}
    if args.json:
        print_json(out)
    else:
        print(f"enrolled {name}: id {did}, AK name {out['ak_name']}, EK certificate {len(roots.tpm[did].ek_cert or b'')} "
              f"bytes; roots: {args.roots}")
    return 0


