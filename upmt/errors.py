"""The project's exception hierarchy.

Every error raised on purpose derives from `UpmtError`. Parsers of network
input raise only `MalformedError` (with the reason), so a receive loop can
catch exactly that, count it and drop the datagram.
"""


class UpmtError(Exception):
    """Base of every error the project raises on purpose."""


class MalformedError(UpmtError):
    """Input from the network that does not parse or violates the protocol."""


class ConfigError(UpmtError):
    """A bad configuration value or command line; the message is one line for the user."""


class SetupError(UpmtError):
    """The kernel refused part of a daemon's set-up (TUN, routes, nftables, sockets)."""
