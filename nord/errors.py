"""One exception family for everything Nord rejects.

Callers at the edges (CLI, HTTP, P2P handlers) catch `NordError` and show its message as one line;
anything else escaping is a bug.
"""


class NordError(Exception):
    """Base of every error Nord raises on purpose; the message is one line a user can act on."""


class ConfigError(NordError, ValueError):
    """A config, recipe name or flag value is invalid."""


class DataError(NordError):
    """A corpus source or prepared corpus is missing, empty, undecodable or unreachable."""


class CodecError(NordError):
    """An encoded delta is malformed, over its limits, or not signed by who it claims."""


class MergeError(NordError):
    """A contribution, removal or seal cannot be applied to a replica."""


class CheckpointError(NordError):
    """A checkpoint is missing, corrupt, truncated, or belongs to another config."""


class TransportError(NordError):
    """A peer, the DHT or a stream failed in a way the user has to fix (port, bootstrap, version)."""
