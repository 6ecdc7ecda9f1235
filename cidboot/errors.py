"""The exception hierarchy shared by every cidboot module.

Callers catch `CidbootError` at the edge (CLIs, servers) to print one clear line and keep
going; code that needs to react to one failure catches the precise subclass. Each module
defines its own subclasses of `FormatError` (malformed input) or `VerificationError`
(well-formed input that fails a hash, signature or policy check), in the style of
python-tuf's one-exception-per-failure.
"""


class CidbootError(Exception):
    """Base of every error cidboot raises on purpose."""


class FormatError(CidbootError, ValueError):
    """Input (network, file, user) is malformed; the message says where and why."""


class VerificationError(CidbootError):
    """Input is well formed but does not verify (hash, signature, expiry, policy...)."""


class NotFoundError(CidbootError, KeyError):
    """A block, pin, key or file that was asked for is not there."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"
