"""Docker's device bookkeeping: ``devicemapper/metadata/<hash>`` (one JSON per thin device,
``base`` for the base device), ``deviceset-metadata``, ``transaction-metadata`` and the legacy
``devicemapper/devicemapper/json`` that dockerd migrates at its next start.

Field names and meanings follow moby's ``daemon/graphdriver/devmapper/deviceset.go`` (Engine
20.10): device ids are 24-bit; dockerd skips ``.migrated`` files, dot files and its two
bookkeeping files when it loads devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmimage.docker.errors import StoreError
from dmimage.docker.paths import Root, check_component

DEVICESET_DIR = "devicemapper"
METADATA_DIR = "devicemapper/metadata"
LOOP_DIR = "devicemapper/devicemapper"
LEGACY_JSON = "devicemapper/devicemapper/json"
DEVICESET_META = "deviceset-metadata"
TRANSACTION_META = "transaction-metadata"
BASE = "base"
MAX_DEVICE_ID = (1 << 24) - 1


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device's JSON. ``hash`` is "" for the base device (file ``base``)."""

    hash: str
    device_id: int
    size: int
    transaction_id: int
    initialized: bool
    deleted: bool
    source: str  # the file it was read from, relative to ROOT

    @property
    def name(self) -> str:
        return self.hash or BASE


@dataclass(frozen=True, slots=True)
class DeviceSetMeta:
    next_device_id: int
    base_device_uuid: str
    base_device_filesystem: str


@dataclass(frozen=True, slots=True)
class OpenTransaction:
    open_transaction_id: int
    device_hash: str
    device_id: int


def _int(obj: dict[str, Any], key: str, where: str, *, default: int | None = None,
         hi: int | None = None) -> int:
    v = obj.get(key, default)
    if v is None:
        raise StoreError(where, f"field {key} is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (hi is not None and v > hi):
        raise StoreError(where, f"field {key} = {v!r} is not an integer in range")
    return v


def _bool(obj: dict[str, Any], key: str, where: str) -> bool:
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise StoreError(where, f"field {key} = {v!r} is not a boolean")
    return v


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key, "")
    if not isinstance(v, str):
        raise StoreError(where, f"field {key} = {v!r} is not a string")
    return v


def parse_device(obj: dict[str, Any], hash_: str, where: str, source: str) -> DeviceInfo:
    return DeviceInfo(hash_, _int(obj, "device_id", where, hi=MAX_DEVICE_ID),
                      _int(obj, "size", where), _int(obj, "transaction_id", where, default=0),
                      _bool(obj, "initialized", where), _bool(obj, "deleted", where), source)


@dataclass(slots=True)
class DeviceTable:
    devices: dict[str, DeviceInfo]  # by hash ("" = base)
    deviceset: DeviceSetMeta | None
    transaction: OpenTransaction | None
    legacy_unmigrated: bool


def _is_device_file(name: str) -> bool:
    return not (name.startswith(".") or name.endswith(".migrated")
                or name in (DEVICESET_META, TRANSACTION_META))


def read_devices(root: Root) -> DeviceTable:
    """Every device JSON under ROOT (per-device files win over an unmigrated legacy file)."""
    devices: dict[str, DeviceInfo] = {}
    legacy = root.exists(LEGACY_JSON)
    if legacy:
        obj = root.read_json_object(LEGACY_JSON)
        table = obj.get("Devices") or {}
        where = root.display(LEGACY_JSON)
        if not isinstance(table, dict):
            raise StoreError(where, "field Devices is not an object")
        for h, info in table.items():
            if h:
                check_component(h, where)
            if not isinstance(info, dict):
                raise StoreError(where, f"Devices[{h!r}] is not an object")
            devices[h] = parse_device(info, h, where, LEGACY_JSON)
    for name in root.listdir(METADATA_DIR):
        if not _is_device_file(name):
            continue
        rel = f"{METADATA_DIR}/{check_component(name, root.display(METADATA_DIR))}"
        if root.is_dir(rel):
            continue
        h = "" if name == BASE else name
        devices[h] = parse_device(root.read_json_object(rel), h, root.display(rel), rel)
    ds = None
    rel = f"{METADATA_DIR}/{DEVICESET_META}"
    if root.exists(rel):
        obj = root.read_json_object(rel)
        w = root.display(rel)
        ds = DeviceSetMeta(_int(obj, "next_device_id", w, default=0, hi=MAX_DEVICE_ID),
                           _str(obj, "BaseDeviceUUID", w), _str(obj, "BaseDeviceFilesystem", w))
    tr = None
    rel = f"{METADATA_DIR}/{TRANSACTION_META}"
    if root.exists(rel):
        obj = root.read_json_object(rel)
        w = root.display(rel)
        tr = OpenTransaction(_int(obj, "open_transaction_id", w, default=0),
                             _str(obj, "device_hash", w),
                             _int(obj, "device_id", w, default=0, hi=MAX_DEVICE_ID))
    return DeviceTable(dict(sorted(devices.items())), ds, tr, legacy)
