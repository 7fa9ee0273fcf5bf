"""The one walk over a :class:`~dmimage.thin.ir.PoolIR`, and the base of the emitters (XML,
human-readable, JSON) it drives.

Every format lays a dump out in the same order: the superblock, every shared run list
(``def``) in the order the IR holds them, then every device with its items (its own runs and
refs to defs) in origin order. :func:`walk` decides that order, and which items are
worth emitting (empty runs are not), once; it tells a :class:`DumpVisitor` each event in turn,
and an :class:`Emitter` only says how each event looks in its format.

Events are per def, device and item, never per mapping, and are direct method calls (no event
objects): the runs of a whole dump are rendered in numpy batches by the emitter's
:class:`~dmimage.thin.dump.render.Document` after the walk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dmimage.thin.dump.render import Document, RunsRenderer
from dmimage.thin.ir import DeviceIR, PoolIR, Runs, SuperblockIR

__all__ = ["DumpVisitor", "Emitter", "walk"]


class DumpVisitor(ABC):
    """What :func:`walk` reports, in this order: ``superblock_begin``; per def ``def_begin``,
    ``runs`` (if any), ``def_end``; per device ``device_begin``, ``runs`` and ``ref`` in origin
    order, ``device_end``; ``superblock_end``."""

    @abstractmethod
    def superblock_begin(self, sb: SuperblockIR) -> None: ...

    @abstractmethod
    def def_begin(self, name: str) -> None: ...

    @abstractmethod
    def def_end(self, name: str) -> None: ...

    @abstractmethod
    def device_begin(self, dev: DeviceIR) -> None: ...

    @abstractmethod
    def runs(self, runs: Runs) -> None:
        """Mapping runs (never empty) inside the def or device last begun."""

    @abstractmethod
    def ref(self, name: str) -> None:
        """The device last begun uses the def ``name`` here."""

    @abstractmethod
    def device_end(self, dev: DeviceIR) -> None: ...

    @abstractmethod
    def superblock_end(self) -> None: ...


def walk(ir: PoolIR, visitor: DumpVisitor) -> None:
    """Report the events of a dump of ``ir`` to ``visitor``, in output order."""
    visitor.superblock_begin(ir.superblock)
    for name, runs in ir.defs.items():
        visitor.def_begin(name)
        if len(runs):
            visitor.runs(runs)
        visitor.def_end(name)
    runs_event, ref_event = visitor.runs, visitor.ref
    for dev in ir.devices:
        visitor.device_begin(dev)
        for item in dev.items:
            if isinstance(item, str):
                ref_event(item)
            elif len(item):
                runs_event(item)
        visitor.device_end(dev)
    visitor.superblock_end()


class Emitter(DumpVisitor):
    """A visitor that builds one format's :class:`Document`; one instance per dump. Subclasses
    give :attr:`render_runs` (one bulk-rendered row per run) and the text of the other
    events."""

    #: The format's :data:`~dmimage.thin.dump.render.RunsRenderer` (a staticmethod).
    render_runs: RunsRenderer

    def __init__(self) -> None:
        self.doc = Document(self.render_runs)

    def runs(self, runs: Runs) -> None:
        self.doc.runs(runs)

    @classmethod
    def document(cls, ir: PoolIR) -> Document:
        """The dump of ``ir`` in this emitter's format."""
        emitter = cls()
        walk(ir, emitter)
        return emitter.doc
