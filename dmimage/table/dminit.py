"""The kernel's ``dm-mod.create=`` boot parameter (drivers/md/dm-init.c).

Syntax: ``name,uuid,minor,flags,table[,table]*[;name,...]`` where a table is
``start length type args``. dm-init splits on the first ``,`` / ``;`` it sees and has no
escapes ("TODO: add support for escaped characters"), so no field may contain either; the
kernel command line lets ``"`` quote spaces but cannot escape ``"`` itself. Only the target
types in :data:`~dmimage.table.kernel.DM_INIT_ALLOWED_TARGETS` are accepted; thin and
thin-pool are not (they need messages from userspace first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dmimage.table import kernel as K
from dmimage.table.args import KEYS_STYLE
from dmimage.table.errors import TableError
from dmimage.table.model import Table
from dmimage.table.text import format_entry, parse_entry

_FORBIDDEN = {",": "comma", ";": "semicolon", '"': "double quote"}


@dataclass(frozen=True)
class DmDevice:
    """One device of a dm-mod.create= set. ``minor`` None lets the kernel choose."""

    name: str
    table: Table
    uuid: str = ""
    minor: int | None = None
    read_only: bool = False


def _clean(text: str, what: str, device: str) -> None:
    for ch, label in _FORBIDDEN.items():
        if ch in text:
            raise TableError(f"{what} contains a {label}, which dm-init cannot escape",
                             field=what, target=device)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise TableError(f"{what} contains a control character", field=what, target=device)
    if text != text.strip(" "):
        raise TableError(f"{what} has leading or trailing spaces, which dm-init strips",
                         field=what, target=device)


def _device(dev: DmDevice) -> str:
    label = f"device {dev.name!r}"
    if not dev.name:
        raise TableError("a device needs a name", field="name")
    _clean(dev.name, "name", label)
    if len(dev.name.encode()) >= K.DM_NAME_LEN:
        raise TableError(f"name is {len(dev.name.encode())} bytes; dm-ioctl holds at most "
                         f"{K.DM_NAME_LEN - 1}", field="name", target=label)
    if "/" in dev.name or dev.name in (".", ".."):
        raise TableError("name cannot contain '/' or be '.' or '..'", field="name",
                         target=label)
    _clean(dev.uuid, "uuid", label)
    if len(dev.uuid.encode()) >= K.DM_UUID_LEN:
        raise TableError(f"uuid is {len(dev.uuid.encode())} bytes; at most "
                         f"{K.DM_UUID_LEN - 1}", field="uuid", target=label)
    if dev.minor is not None and not 0 <= dev.minor <= K.DM_MAX_MINOR:
        raise TableError(f"minor {dev.minor} is outside 0..{K.DM_MAX_MINOR}", field="minor",
                         target=label)
    n = len(dev.table.entries)
    if n > K.DM_INIT_MAX_TARGETS:
        raise TableError(f"{n} targets; dm-init takes at most {K.DM_INIT_MAX_TARGETS} per "
                         "device", field="table", target=label)
    try:
        dev.table.validate()
    except TableError as exc:
        raise TableError(f"{exc}", field="table", target=label, errors=exc.errors) from None
    lines = []
    for i, e in enumerate(dev.table.entries):
        if e.type_name not in K.DM_INIT_ALLOWED_TARGETS:
            raise TableError(f"target type {e.type_name!r} is not allowed in dm-mod.create= "
                             f"(dm-init.c allows {', '.join(K.DM_INIT_ALLOWED_TARGETS)})",
                             line=dev.table.line_of(i), field="type", target=label)
        text = format_entry(e, KEYS_STYLE).rstrip(" ")
        if not e.target.params(KEYS_STYLE).strip():
            text += " "  # dm-init needs a space after the type even with no arguments
        _clean(text.rstrip(" "), "table", label)
        lines.append(text)
    flags = "ro" if dev.read_only else "rw"
    minor = "" if dev.minor is None else str(dev.minor)
    return ",".join([dev.name, dev.uuid, minor, flags, *lines])


def dm_mod_create(devices: Sequence[DmDevice]) -> str:
    """The value of ``dm-mod.create=`` for these devices, checked against dm-init's limits."""
    if not devices:
        raise TableError("dm-mod.create= needs at least one device")
    if len(devices) > K.DM_INIT_MAX_DEVICES:
        raise TableError(f"{len(devices)} devices; dm-init takes at most "
                         f"{K.DM_INIT_MAX_DEVICES}")
    names = [d.name for d in devices]
    for name in names:
        if names.count(name) > 1:
            raise TableError(f"device name {name!r} is used twice", field="name")
    value = ";".join(_device(d) for d in devices)
    if len(value.encode()) >= K.DM_INIT_MAX_STR:
        raise TableError(f"the value is {len(value.encode())} bytes; dm-init refuses "
                         f"{K.DM_INIT_MAX_STR} or more")
    return value


def dm_mod_create_param(devices: Sequence[DmDevice]) -> str:
    """The whole kernel command-line word, quoted: ``dm-mod.create="..."``."""
    return f'dm-mod.create="{dm_mod_create(devices)}"'


def _fields(text: str, sep: str, count: int) -> tuple[list[str], str | None]:
    """dm-init's str_field_delimit, ``count`` times: fields stripped of spaces, then the rest."""
    out = []
    rest: str | None = text
    for _ in range(count):
        if rest is None:
            raise TableError(f"expected {count + 1} {sep!r}-separated fields")
        head, found, tail = rest.partition(sep)
        out.append(head.strip(" "))
        rest = tail if found else None
    return out, rest


def parse_dm_mod_create(text: str) -> list[DmDevice]:
    """Read a ``dm-mod.create=`` value the way dm-init.c does (outer quotes optional)."""
    value = text.strip()
    if value.startswith("dm-mod.create="):
        value = value[len("dm-mod.create="):]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    devices: list[DmDevice] = []
    rest: str | None = value
    while rest is not None:
        if len(devices) >= K.DM_INIT_MAX_DEVICES:
            raise TableError(f"more than {K.DM_INIT_MAX_DEVICES} devices")
        fields, tables = _fields(rest, ",", 4)
        if tables is None:
            raise TableError("device entry needs name,uuid,minor,flags,table")
        tables, _, after = tables.partition(";")
        rest = after if _ else None
        name, uuid, minor_s, flags = fields
        if flags not in ("ro", "rw"):
            raise TableError(f"flags must be 'ro' or 'rw', not {flags!r}", field="flags",
                             target=f"device {name!r}")
        minor = None
        if minor_s:
            try:
                minor = int(minor_s, 0)
            except ValueError:
                raise TableError(f"bad minor {minor_s!r}", field="minor",
                                 target=f"device {name!r}") from None
        entries = []
        for k, piece in enumerate(tables.split(","), start=1):
            entries.append(parse_entry(piece.strip(" "), k))
        devices.append(DmDevice(name, Table(tuple(entries)), uuid, minor, flags == "ro"))
    return devices
