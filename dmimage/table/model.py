"""A table: target lines covering a device from sector 0, in order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dmimage.table.args import KernelVersion
from dmimage.table.errors import TableError
from dmimage.table.targets import Target


@dataclass(frozen=True)
class Entry:
    """One table line: ``start length target args...`` (sectors of 512 bytes)."""

    start: int
    length: int
    target: Target

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def type_name(self) -> str:
        return self.target.type_name


@dataclass(frozen=True)
class Table:
    """The lines of one device's table.

    ``source_lines`` remembers which text line each entry came from, so errors can name it;
    it is not part of the value (two tables with the same entries are equal).
    """

    entries: tuple[Entry, ...]
    source_lines: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))

    @property
    def size(self) -> int:
        """Sectors covered, assuming the table is contiguous."""
        return self.entries[-1].end if self.entries else 0

    def line_of(self, index: int) -> int:
        """The line to name in errors about entry ``index``."""
        if self.source_lines is not None and index < len(self.source_lines):
            return self.source_lines[index]
        return index + 1

    def problems(self, sizes: Mapping[str, int] | None = None,
                 kernel: KernelVersion | None = None) -> list[TableError]:
        """Every rule this table breaks, errors and warnings (``TableError.warning``)."""
        from dmimage.table.validate import table_problems

        return table_problems(self, sizes, kernel)

    def kernel_form(self, kernel: KernelVersion | None = None) -> Table:
        """The table as that kernel holds it (and ``dmsetup table`` prints it): implied
        defaults made explicit (6.12's flakey), repeated flags once, a crypt key's odd last
        hex digit dropped. Devices stay as written: the kernel prints ``major:minor``."""
        entries = tuple(
            Entry(e.start, e.length, e.target.kernel_form(kernel))
            if hasattr(e.target, "kernel_form") else e for e in self.entries)
        return Table(entries, self.source_lines)

    def validate(self, sizes: Mapping[str, int] | None = None,
                 kernel: KernelVersion | None = None) -> list[TableError]:
        """Raise a TableError (listing all errors in ``.errors``) if the kernel would refuse.

        ``sizes`` maps device names as written in the table (``253:1``, ``/dev/sdb``) to their
        size in sectors; devices not in it are not size-checked. Returns the warnings.
        """
        found = self.problems(sizes, kernel)
        errors = [p for p in found if not p.warning]
        if errors:
            first = errors[0]
            raise TableError(first.detail, line=first.line, field=first.field,
                             target=first.target, errors=errors)
        return found
