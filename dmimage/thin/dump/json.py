"""JSON dump format ``dmimage-thin-dump`` version 1 (documented in docs/dump-json.md).

Writer: an emitter of the one walk (dump/walk.py), one run per line, rendered in bulk like the
XML. Parser: back into the IR.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, BinaryIO

import numpy as np

from dmimage.errors import DeviceError
from dmimage.thin.dump.render import Document, render_rows
from dmimage.thin.dump.walk import Emitter
from dmimage.thin.dump.xml import DumpFormatError
from dmimage.thin.ir import U32, U64, DeviceIR, PoolIR, Runs, SuperblockIR

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "JsonEmitter", "json_document", "write_json",
           "json_bytes", "parse_json"]

FORMAT_NAME = "dmimage-thin-dump"
FORMAT_VERSION = 1

_PARTS = [b"        [", b", ", b", ", b", ", b"],\n"]
_SB_KEYS = ("uuid", "time", "transaction", "flags", "version", "data_block_size",
            "nr_data_blocks", "metadata_snap")
_DEV_KEYS = ("dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time")


def _render(origin: np.ndarray, data: np.ndarray, length: np.ndarray, time: np.ndarray,
            want_lengths: bool) -> tuple[np.ndarray, np.ndarray | None]:
    return render_rows(_PARTS, [origin, data, length, time], want_lengths)


class JsonEmitter(Emitter):
    """The ``dmimage-thin-dump`` document. A def's runs and a device's mappings are lists with
    one element per line, runs as ``[origin, data, length, time]``, refs as ``{"ref": NAME}``.
    Bulk-rendered rows end with ``,\\n``; JSON wants no comma after a list's last element, so
    each item is held back until the next one (or the list's end) says whether it is last."""

    render_runs = staticmethod(_render)

    def __init__(self) -> None:
        super().__init__()
        self._pending: Runs | str | None = None
        self._defs = 0
        self._devices = 0
        self._in_devices = False

    def superblock_begin(self, sb: SuperblockIR) -> None:
        head = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        sbd = {k: getattr(sb, k) for k in _SB_KEYS}
        self.doc.text("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n"
                                      for k, v in head.items())
                      + f'  "superblock": {json.dumps(sbd)},\n  "defs": [')

    def def_begin(self, name: str) -> None:
        self.doc.text(("," if self._defs else "")
                      + f'\n    {{"name": {json.dumps(name)}, "runs": [\n')
        self._defs += 1

    def def_end(self, name: str) -> None:
        self._end_list()

    def device_begin(self, dev: DeviceIR) -> None:
        self._start_devices()
        dd = {k: getattr(dev, k) for k in _DEV_KEYS}
        self.doc.text(("," if self._devices else "")
                      + f'\n    {json.dumps(dd)[:-1]}, "mappings": [\n')
        self._devices += 1

    def runs(self, runs: Runs) -> None:
        self._flush(last=False)
        self._pending = runs

    def ref(self, name: str) -> None:
        self._flush(last=False)
        self._pending = name

    def device_end(self, dev: DeviceIR) -> None:
        self._end_list()

    def superblock_end(self) -> None:
        self._start_devices()
        self.doc.text("\n  ]\n}\n" if self._devices else "]\n}\n")

    def _start_devices(self) -> None:
        if not self._in_devices:
            self.doc.text("\n  ],\n" if self._defs else "],\n")
            self.doc.text('  "devices": [')
            self._in_devices = True

    def _end_list(self) -> None:
        self._flush(last=True)
        self.doc.text("    ]}")

    def _flush(self, *, last: bool) -> None:
        it, self._pending = self._pending, None
        if it is None:
            return
        if isinstance(it, str):
            self.doc.text(f'        {{"ref": {json.dumps(it)}}}' + ("\n" if last else ",\n"))
        elif not last:
            self.doc.runs(it)
        else:
            if len(it) > 1:
                self.doc.runs(Runs(it.origin_begin[:-1], it.data_begin[:-1], it.length[:-1],
                                   it.time[:-1]))
            self.doc.text(f"        [{int(it.origin_begin[-1])}, {int(it.data_begin[-1])}, "
                          f"{int(it.length[-1])}, {int(it.time[-1])}]\n")


def json_document(ir: PoolIR) -> Document:
    return JsonEmitter.document(ir)


def write_json(ir: PoolIR, out: BinaryIO) -> None:
    json_document(ir).write_to(out)


def json_bytes(ir: PoolIR) -> bytes:
    return json_document(ir).getvalue()


# --------------------------------------------------------------------------------- parsing

def _int(v: object, what: str, hi: int = (1 << 64) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise DumpFormatError(f"{what}: expected an integer in 0..{hi}, got {v!r}")
    return v


def _runs(rows: object, what: str) -> Runs:
    if not isinstance(rows, list):
        raise DumpFormatError(f"{what}: expected a list of runs")
    if not rows:
        return Runs.empty()
    try:
        a = np.array(rows, dtype=object)
        if a.ndim != 2 or a.shape[1] != 4:
            raise ValueError
        if any(isinstance(x, bool) or not isinstance(x, int) for x in a.ravel()):
            raise ValueError
        a = np.array(rows, dtype=U64)
    except (ValueError, OverflowError, TypeError):
        raise DumpFormatError(f"{what}: every run must be [origin, data, length, time] "
                              "with non-negative integers") from None
    if (a[:, 2] == 0).any():
        raise DumpFormatError(f"{what}: run with length 0")
    if (a[:, 3] >= (1 << 32)).any():
        raise DumpFormatError(f"{what}: time does not fit 32 bits")
    return Runs(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), a[:, 3].astype(U32))


def parse_json(source: str | os.PathLike[str] | bytes | IO[bytes]) -> PoolIR:
    """Parse a ``dmimage-thin-dump`` JSON document (path, bytes or binary file) into the IR."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            doc = json.loads(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            try:
                with open(source, "rb") as f:
                    doc = json.load(f)
            except OSError as exc:
                raise DeviceError(f"{os.fspath(source)}: {exc.strerror}") from None
        else:
            doc = json.load(source)
    except json.JSONDecodeError as exc:
        raise DumpFormatError(f"invalid JSON: {exc.msg}", line=exc.lineno) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise DumpFormatError(f'not a {FORMAT_NAME} document ("format" missing or different)')
    if doc.get("version") != FORMAT_VERSION:
        raise DumpFormatError(f"unsupported {FORMAT_NAME} version {doc.get('version')!r}")
    sbd = doc.get("superblock")
    if not isinstance(sbd, dict):
        raise DumpFormatError("missing superblock object")
    for k in ("time", "transaction", "data_block_size", "nr_data_blocks"):
        if k not in sbd:
            raise DumpFormatError(f"superblock lacks {k}")
    uuid = sbd.get("uuid", "")
    if not isinstance(uuid, str):
        raise DumpFormatError("superblock.uuid must be a string")
    snap = sbd.get("metadata_snap")
    sb = SuperblockIR(uuid=uuid, time=_int(sbd["time"], "superblock.time", (1 << 32) - 1),
                      transaction=_int(sbd["transaction"], "superblock.transaction"),
                      flags=_int(sbd.get("flags", 0), "superblock.flags", (1 << 32) - 1),
                      version=_int(sbd.get("version", 2), "superblock.version", (1 << 32) - 1),
                      data_block_size=_int(sbd["data_block_size"], "superblock.data_block_size",
                                           (1 << 32) - 1),
                      nr_data_blocks=_int(sbd["nr_data_blocks"], "superblock.nr_data_blocks"),
                      metadata_snap=None if snap is None
                      else _int(snap, "superblock.metadata_snap"))
    defs: dict[str, Runs] = {}
    for i, dd in enumerate(doc.get("defs", [])):
        if not isinstance(dd, dict) or not isinstance(dd.get("name"), str):
            raise DumpFormatError(f"defs[{i}]: needs a string name")
        if dd["name"] in defs:
            raise DumpFormatError(f"defs[{i}]: name {dd['name']!r} defined twice")
        defs[dd["name"]] = _runs(dd.get("runs", []), f"defs[{i}].runs")
    devices: list[DeviceIR] = []
    seen: set[int] = set()
    for i, dv in enumerate(doc.get("devices", [])):
        if not isinstance(dv, dict):
            raise DumpFormatError(f"devices[{i}]: expected an object")
        for k in _DEV_KEYS:
            if k not in dv:
                raise DumpFormatError(f"devices[{i}] lacks {k}")
        hi32 = (1 << 32) - 1
        dev = DeviceIR(_int(dv["dev_id"], f"devices[{i}].dev_id", hi32),
                       _int(dv["mapped_blocks"], f"devices[{i}].mapped_blocks"),
                       _int(dv["transaction"], f"devices[{i}].transaction"),
                       _int(dv["creation_time"], f"devices[{i}].creation_time", hi32),
                       _int(dv["snap_time"], f"devices[{i}].snap_time", hi32))
        if dev.dev_id in seen:
            raise DumpFormatError(f"devices[{i}]: device {dev.dev_id} appears twice")
        seen.add(dev.dev_id)
        maps = dv.get("mappings", [])
        if not isinstance(maps, list):
            raise DumpFormatError(f"devices[{i}].mappings must be a list")
        pending: list[Any] = []
        for j, m in enumerate(maps):
            if isinstance(m, dict):
                name = m.get("ref")
                if not isinstance(name, str) or name not in defs:
                    raise DumpFormatError(f"devices[{i}].mappings[{j}]: ref to an unknown def")
                if pending:
                    dev.items.append(_runs(pending, f"devices[{i}].mappings"))
                    pending = []
                dev.items.append(name)
            else:
                pending.append(m)
        if pending:
            dev.items.append(_runs(pending, f"devices[{i}].mappings"))
        devices.append(dev)
    return PoolIR(sb, devices, defs)
