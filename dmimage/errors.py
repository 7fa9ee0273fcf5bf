"""Exception types shared by every layer.

Each carries enough context (block number, field) to print as one line; the CLI maps the
classes to exit codes (see docs/cli.md), so callers never parse message strings.
"""

from __future__ import annotations


class DmimageError(Exception):
    """Base of every error dmimage raises on purpose."""

    exit_code = 2


class UsageError(DmimageError):
    """The caller asked for something impossible (bad option combination, bad value)."""

    exit_code = 2


class DeviceError(DmimageError):
    """The metadata or data file cannot be opened, read or written."""

    exit_code = 2


class MetadataError(DmimageError):
    """Metadata is damaged: a block fails validation or a structure is inconsistent.

    ``block`` is the metadata block number involved, when one is known; ``field`` names the
    on-disk field or structure that is wrong.
    """

    exit_code = 1

    def __init__(self, message: str, *, block: int | None = None, field: str | None = None):
        super().__init__(message)
        self.detail = message
        self.block = block
        self.field = field

    def __str__(self) -> str:
        where = []
        if self.block is not None:
            where.append(f"block {self.block}")
        if self.field:
            where.append(self.field)
        return (", ".join(where) + ": " if where else "") + self.detail


class ChecksumError(MetadataError):
    """A block's stored crc32c does not match its contents (or the block is of another type)."""


class BlockNumberError(MetadataError):
    """A block's self-location field does not match where it was read from."""


class FormatError(MetadataError):
    """A field holds a value the format does not allow (magic, flags, sizes, ...)."""


class InputError(DmimageError):
    """An input file (a dump to restore, a spec, ...) is malformed or describes impossible
    metadata: invalid input, exit 1 like damaged metadata (docs/cli.md)."""

    exit_code = 1


class OutputTooSmallError(DeviceError):
    """The output device cannot hold what would be written; nothing was written.

    ``needed_bytes`` is the smallest size that would do.
    """

    def __init__(self, message: str, *, needed_bytes: int):
        self.needed_bytes = needed_bytes
        super().__init__(message)


class LockTimeout(DeviceError):
    """Another process held the lock on a metadata or data file longer than --lock-timeout."""


class DeviceBusy(DeviceError):
    """A block device is claimed by someone else (a live pool's DM table, a mount): writing
    to it is refused before anything is written. ``holders`` names them (``dm-3 (pool)``)."""

    def __init__(self, message: str, *, holders: list[str]):
        self.holders = holders
        super().__init__(message)
