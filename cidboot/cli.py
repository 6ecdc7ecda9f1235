"""Shared command-line conventions for the four console scripts.

Every component CLI (`imagebuilder`, `bootstrap`, `agent`, `firmware`) is a set of
subcommand modules in `<component>/commands/`, discovered here so that adding a command
never means editing a central list. A command module defines:

    def register(sub: argparse._SubParsersAction) -> None   # adds its parser(s)
    # and each parser it adds calls  parser.set_defaults(func=run)
    def run(args: argparse.Namespace) -> int                   # returns the exit code

Conventions applied here once: `--help` everywhere, `-v/--verbose` (repeatable), `-q/--quiet`,
`--log-json` for one JSON object per log line, errors as one line on stderr
(`prog: error: ...`), exit 0 ok, 1 on a cidboot error (bad input, failed verification),
2 on usage errors, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from cidboot.errors import CidbootError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any `extra=` fields."""

    _std = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._std and not k.startswith("_"):
                out[k] = v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=True)


def setup_logging(verbose: int = 0, quiet: bool = False, log_json: bool = False) -> None:
    """Configure the root logger on stderr; stdout stays for command output."""
    level = logging.WARNING if quiet else (logging.INFO if verbose == 1 else
                                           logging.DEBUG if verbose >= 2 else logging.WARNING)
    if not quiet and verbose == 0:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if log_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def add_common_flags(p: argparse.ArgumentParser, *, sub: bool = False) -> None:
    """-v/-q/--log-json, accepted before or after the subcommand (a subcommand's copy has no
    default, so it only overrides what the top level parsed when given)."""
    d = argparse.SUPPRESS if sub else None
    p.add_argument("-v", "--verbose", action="count", default=d if sub else 0, help="more log output (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", default=d if sub else False,
                   help="only errors; no progress output")
    p.add_argument("--log-json", action="store_true", default=d if sub else False,
                   help="log one JSON object per line on stderr")


def _subparsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out.append(child)
                out.extend(_subparsers(child))
    return out


def build_parser(prog: str, description: str, commands_package: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_common_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    pkg = importlib.import_module(commands_package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands_package}.{info.name}")
        mod.register(sub)
    for child in _subparsers(parser):
        add_common_flags(child, sub=True)
    return parser


def run_main(prog: str, description: str, commands_package: str, argv: Sequence[str] | None = None) -> int:
    parser = build_parser(prog, description, commands_package)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    setup_logging(args.verbose, args.quiet, args.log_json)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return EXIT_OK
    except CidbootError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


class Progress:
    """Progress for long work on stderr: a redrawn line on a TTY, a log line every few
    seconds otherwise (so CI logs show progress without flooding). Silent when quiet."""

    def __init__(self, label: str, total: int | None = None, quiet: bool = False, unit: str = "B") -> None:
        self.label, self.total, self.quiet, self.unit = label, total, quiet, unit
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.quiet or now - self._last < (0.2 if self._tty else 5.0):
            return
        self._last = now
        self._emit(final=False)

    def close(self) -> None:
        if not self.quiet and (self._tty or time.monotonic() - self._t0 > 1.0):
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        el = max(time.monotonic() - self._t0, 1e-9)
        amount = f"{self.done / 2**20:.1f} MiB" if self.unit == "B" else f"{self.done} {self.unit}"
        of = ""
        if self.total:
            of = f" / {self.total / 2**20:.1f} MiB" if self.unit == "B" else f" / {self.total}"
        rate = f" ({self.done / 2**20 / el:.1f} MiB/s)" if self.unit == "B" else ""
        line = f"{self.label}: {amount}{of}{rate}"
        if self._tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
