"""The project's exception hierarchy.

Every error raised on purpose derives from `UpmtError`. Parsers of network
input raise only `MalformedError` (with the reason), so a receive loop can
catch exactly that, count it and drop the datagram.
"""

import contextlib
from collections.abc import Iterator


class UpmtError(Exception):
    """Base of every error the project raises on purpose."""


class MalformedError(UpmtError):
    """Input from the network that does not parse or violates the protocol."""


class ConfigError(UpmtError):
    """A bad configuration value or command line; the message is one line for the user."""


class SetupError(UpmtError):
    """The kernel refused part of a daemon's set-up (TUN, routes, nftables, sockets)."""


@contextlib.contextmanager
def unwrap_errors() -> Iterator[None]:
    """Re-raise the first UpmtError out of trio's exception groups.

    A daemon's tasks run in nurseries, which wrap what they raise in an
    ExceptionGroup; the command line wants the one error that explains the
    exit, as one line.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        found = _first(group)
        if found is None:
            raise
        raise found from None


def _first(group: BaseExceptionGroup[BaseException]) -> UpmtError | None:
    for exc in group.exceptions:
        if isinstance(exc, UpmtError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first(exc)
            if inner is not None:
                return inner
    return None
