"""Shared command-line conventions for the four console scripts.

Every component CLI (`imagebuilder`, `bootstrap`, `agent`, `firmware`) is a set of
subcommand modules in `<component>/commands/`, discovered here so that adding a command
never means editing a central list. A command module defines:

    def register(sub: argparse._SubParsersAction) -> None   # adds its parser(s)
    # and each parser it adds calls  parser.set_defaults(func=run)
    def run(args: argparse.Namespace) -> int                   # returns the exit code

Conventions applied here once: `--help` and `--version` everywhere, `-v/--verbose`
(repeatable), `-q/--quiet`, `--log-json` for one JSON object per stderr line (log records and
everything a command prints on stderr: progress, refusals, errors), errors as one line on
stderr (`prog: error: ...`, the traceback before it under `-v`), exit 0 ok, 1 on a cidboot
error (bad input, failed verification) or an unexpected exception (`internal error: ...`), 2 on
usage errors (argparse's and `UsageError`), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import json
import logging
import pkgutil
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from cidboot import __version__
from cidboot.errors import CidbootError, FormatError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(FormatError):
    """The command line names something the command cannot mean (a role the flow does not
    have, contradictory options): exit 2 like argparse's own errors, not 1 like bad data."""


class CliParser(argparse.ArgumentParser):
    """argparse with the error convention: one line `prog: error: ...` on stderr, exit 2
    (argparse prints the usage block first; the hint to `--help` replaces it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class ListenError(CidbootError):
    """A server cannot bind its address: names the address and the likely cause."""


def listen_error(e: OSError, host: str, port: int, what: str = "listen", *, where: str | None = None) -> ListenError:
    """Turn a bind(2) failure into a message a user can act on: which HOST:PORT (or `where`,
    for a server with several), and why it usually happens (the bare "Address already in use"
    names neither)."""
    addr = where or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    hints = {
        errno.EADDRINUSE: "another process is listening there (an earlier server still running?); "
                          "stop it, or pick another port (port 0 picks a free one)",
        errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
        errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
    }
    hint = hints.get(e.errno or 0, "")
    return ListenError(f"cannot {what} on {addr}: {e.strerror or e}" + (f": {hint}" if hint else ""))


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
    parser = CliParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}",
                        help="print the program's version and exit")
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


class JsonLines(io.TextIOBase):
    """sys.stderr while `--log-json` is on. Commands print progress, refusals and errors on
    stderr as text (`imagebuilder: pinned ...`, `agent: role: refused: ...`); a log collector
    reading JSON lines would choke on them. So every line written here becomes one JSON object
    (ts, level, logger = the program, msg without the `prog [command]: ` prefix; level from an `error:` or
    `warning:` prefix), and lines that already are JSON objects (the logging handler's) pass
    through untouched. `\r` ends a line too (a TTY progress redraw)."""

    def __init__(self, prog: str, target: TextIO) -> None:
        super().__init__()
        self.prog, self.target = prog, target
        self._buf = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # progress emits whole lines, not redraws

    def write(self, s: str) -> int:
        self._buf += s.replace("\r", "\n")
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                self.target.write(self.encode_line(line) + "\n")
        return len(s)

    def encode_line(self, line: str) -> str:
        if line.startswith("{"):
            try:
                if isinstance(json.loads(line), dict):
                    return line
            except ValueError:
                pass
        m = re.match(rf"{re.escape(self.prog)}(?: [\w.-]+)*: ", line)  # `prog: ` or `prog sub: `
        msg = line[m.end():] if m else line
        level = "warning" if re.match(r"[\w.-]+: (refused|veto): ", msg) else "info"  # agent run's refusal lines
        for lv in ("error", "warning"):
            if msg.startswith(f"{lv}: "):
                level, msg = lv, msg[len(lv) + 2:]
                break
        return json.dumps({"ts": round(time.time(), 6), "level": level, "logger": self.prog, "msg": msg},
                          sort_keys=True)

    def flush(self) -> None:
        if self._buf:
            self.write("\n")
        self.target.flush()


def run_main(prog: str, description: str, commands_package: str, argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.stderr
    if "--log-json" in argv:  # before parsing, so argparse's own errors are JSON lines too
        sys.stderr = JsonLines(prog, saved)
    try:
        return _run(prog, description, commands_package, argv)
    finally:
        if sys.stderr is not saved:
            sys.stderr.flush()
            sys.stderr = saved


def _run(prog: str, description: str, commands_package: str, argv: list[str]) -> int:
    parser = build_parser(prog, description, commands_package)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse's own exit codes
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.log_json and not isinstance(sys.stderr, JsonLines):  # given abbreviated (--log-j)
        sys.stderr = JsonLines(prog, sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    setup_logging(args.verbose, args.quiet, args.log_json)
    log = logging.getLogger(prog)

    def fail(message: str, code: int) -> int:
        if args.verbose:  # the traceback, for whoever debugs; the one line stays last
            log.error("traceback", exc_info=True)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return EXIT_OK
    except UsageError as e:
        return fail(str(e), EXIT_USAGE)
    except CidbootError as e:
        return fail(str(e), EXIT_ERROR)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return fail(f"{e.strerror or e}{where}", EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line (JSON under --log-json), the traceback under -v
        hint = "" if args.verbose else " (run with -v for the traceback)"
        return fail(f"internal error: {type(e).__name__}: {e}{hint}", EXIT_ERROR)


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB" (sizes freed, cache sizes)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, i = float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{n} B" if i == 0 else f"{size:.1f} {units[i]}"


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
