"""The exceptions kvtier raises. Every one derives from KvtierError."""

from __future__ import annotations


class KvtierError(Exception):
    """Base of every error kvtier raises on purpose."""


class ConfigError(KvtierError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


class CorruptChunk(KvtierError):
    """Stored bytes failed to decode or verify. Never returned to a caller as data."""


class TierUnavailable(KvtierError):
    """A tier could not do its job right now (server down, disk full, permission denied).

    Tiers raise it (or let an OSError / client error escape); the store turns it into a miss or
    a skipped write, so it never reaches code on the read path.
    """
