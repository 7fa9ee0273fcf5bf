"""Dumping pool metadata (XML as thin_dump 1.1, human-readable, JSON) and parsing dumps back.

Public API:

* :func:`pool_to_ir` (``Pool`` -> ``PoolIR``, with thin_dump 1.1's shared-leaf defs/refs);
* :func:`write_dump` (any of :data:`FORMATS`: the one walk of dump/walk.py driving that
  format's emitter; ``expand=True``: no defs, runs re-merged, which thin_restore 0.9 also
  reads), and per format :func:`write_xml` / :func:`xml_bytes`, :func:`write_human` /
  :func:`human_bytes`, :func:`write_json` / :func:`json_bytes`;
* :func:`parse_xml`, :func:`parse_json`, :func:`parse_dump` (either, sniffed) -> ``PoolIR``;
* :func:`expand_shared` (splice refs into devices), :func:`dump_pool` (open, then read and
  write as one stream: :func:`stream_dump`, whose memory is a batch of leaves).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, BinaryIO

# walk is both a submodule and the function exported under its name: imported here, the
# function stays the package's attribute whichever submodule is loaded later.
from dmimage.thin.dump.walk import DumpVisitor, Emitter, walk
from dmimage.thin.ir import PoolIR

if TYPE_CHECKING:
    from dmimage.progress import Progress
    from dmimage.thin.dump.human import HumanEmitter, human_bytes, write_human
    from dmimage.thin.dump.json import JsonEmitter, json_bytes, parse_json, write_json
    from dmimage.thin.dump.reader import gather_runs, pool_to_ir, superblock_ir
    from dmimage.thin.dump.stream import stream_dump
    from dmimage.thin.dump.xml import (
        DumpFormatError,
        XmlEmitter,
        expand_shared,
        merge_runs,
        parse_xml,
        write_xml,
        xml_bytes,
    )

__all__ = [
    "DumpFormatError", "DumpVisitor", "EMITTERS", "Emitter", "FORMATS", "HumanEmitter",
    "JsonEmitter", "XmlEmitter", "dump_pool", "expand_shared", "gather_runs", "human_bytes",
    "json_bytes", "merge_runs", "parse_dump", "parse_json", "parse_xml", "pool_to_ir",
    "stream_dump", "superblock_ir", "walk", "write_dump", "write_human", "write_json", "write_xml",
    "xml_bytes",
]

#: The dump formats (:data:`EMITTERS` has their emitters).
FORMATS = ("xml", "human_readable", "json")
#: Where each export lives: imported on first use, so a command loads only the formats and
#: readers it needs (restore's parser does not pull in the pool readers and the emitters).
_LAZY = {
    **dict.fromkeys(("HumanEmitter", "human_bytes", "write_human"), "human"),
    **dict.fromkeys(("JsonEmitter", "json_bytes", "parse_json", "write_json"), "json"),
    **dict.fromkeys(("gather_runs", "pool_to_ir", "superblock_ir"), "reader"),
    "stream_dump": "stream",
    **dict.fromkeys(("DumpFormatError", "XmlEmitter", "expand_shared", "merge_runs",
                     "parse_xml", "write_xml", "xml_bytes"), "xml"),
}


def __getattr__(name: str) -> Any:
    if name == "EMITTERS":  # each dump format and the emitter that writes it
        emitters = {fmt: _emitter(fmt) for fmt in FORMATS}
        globals()[name] = emitters
        return emitters
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


#: each format's emitter class: (its module, its name)
_EMITTER_OF = {"xml": ("xml", "XmlEmitter"), "human_readable": ("human", "HumanEmitter"),
               "json": ("json", "JsonEmitter")}


def _emitter(fmt: str) -> Any:
    """The emitter class of one format, importing only its module (an XML dump does not
    load the JSON and human-readable emitters, nor the json module)."""
    where = _EMITTER_OF.get(fmt)
    if where is None:
        raise ValueError(f"unknown dump format {fmt!r}")
    return getattr(importlib.import_module(f"{__name__}.{where[0]}"), where[1])


def write_dump(ir: PoolIR, out: BinaryIO, fmt: str = "xml", *, expand: bool = False) -> None:
    """Write the IR in one of :data:`FORMATS` to a binary stream."""
    emitter = _emitter(fmt)
    emitter.document(__getattr__("expand_shared")(ir) if expand else ir).write_to(out)


def dump_pool(metadata: str | os.PathLike[str], out: BinaryIO, fmt: str = "xml", *,
              metadata_snap: bool | int = False, dev_ids: Iterable[int] | None = None,
              skip_mappings: bool = False, expand: bool = False,
              progress: Progress | None = None) -> None:
    """Open metadata and write the dump as it is read (what ``dmimage dump`` does);
    ``progress`` hears of the leaves written (:func:`stream_dump`)."""
    from dmimage.thin.dump.stream import stream_dump
    from dmimage.thin.pool import open_pool

    emitter = _emitter(fmt)
    with open_pool(metadata, metadata_snap=metadata_snap) as pool:
        stream_dump(pool, out, emitter(), dev_ids=dev_ids, skip_mappings=skip_mappings,
                    expand=expand, progress=progress)


def parse_dump(source: str | os.PathLike[str] | bytes | IO[bytes]) -> PoolIR:
    """Parse an XML (thin_dump 0.9/1.x) or JSON (dmimage) dump, telling them apart by the
    first non-blank byte. A seekable file object is read from where it stands (a pipe's:
    dump/source.py's open_dump), any other one whole."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:4096])
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                head = f.read(4096)
        except OSError as exc:
            from dmimage.errors import DeviceError
            raise DeviceError(f"{os.fspath(source)}: {exc.strerror}") from None
    elif source.seekable():
        start = source.tell()
        head = source.read(4096)
        source.seek(start)
    else:
        data = source.read()
        source, head = data, data[:4096]
    first = head.lstrip()[:1]
    if first == b"{":
        from dmimage.thin.dump.json import parse_json
        return parse_json(source)
    from dmimage.thin.dump.xml import DumpFormatError, parse_xml

    if first == b"<":
        return parse_xml(source)
    raise DumpFormatError("neither XML nor JSON (expected '<' or '{' first)")
