"""TableError: one problem in a device-mapper table, printable as one line."""

from __future__ import annotations

from dmimage.errors import DmimageError


class TableError(DmimageError):
    """A table line is malformed, or a table breaks a rule the kernel (or dm-init) enforces.

    ``line`` is the 1-based line number in the source text (or the 1-based target index for a
    table built in memory); ``field`` names the argument at fault (``data_block_size``,
    ``start`` ...). ``errors`` lists every problem when validation found several; ``warning``
    marks problems the kernel accepts but that are almost certainly mistakes.
    """

    exit_code = 1

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None,
                 target: str | None = None, warning: bool = False,
                 errors: list[TableError] | None = None):
        super().__init__(message)
        self.detail = message
        self.line = line
        self.field = field
        self.target = target
        self.warning = warning
        self.errors: list[TableError] = errors if errors is not None else [self]

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        what = " ".join(p for p in (self.target, self.field) if p)
        if what:
            where.append(what)
        return (", ".join(where) + ": " if where else "") + self.detail
