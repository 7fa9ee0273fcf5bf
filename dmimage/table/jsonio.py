"""JSON form of a table (schema in docs/tables.md): one object per line, typed fields.

Reading is strict (unknown keys and wrong types are errors naming the target index) so a
typo in a hand-written file is not silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dmimage.table.args import DEFAULT_STYLE, Style
from dmimage.table.crypt import CRYPT_FEATURES
from dmimage.table.cryptkey import CryptKey
from dmimage.table.errors import TableError
from dmimage.table.faults import FLAKEY_FEATURES, DelayClass
from dmimage.table.features import FeatureDef, feature_text, features_from_texts
from dmimage.table.model import Entry, Table
from dmimage.table.snapshot import SNAPSHOT_FEATURES
from dmimage.table.targets import (
    TYPED,
    Error,
    Generic,
    Linear,
    Stripe,
    Striped,
    Target,
    Thin,
    ThinPool,
    Zero,
)
from dmimage.table.verity import VERITY_FEATURES

#: The feature vocabulary of each target whose ``features`` field holds parsed features.
_FEATURE_DEFS: dict[str, tuple[FeatureDef, ...]] = {
    "crypt": CRYPT_FEATURES, "flakey": FLAKEY_FEATURES, "snapshot": SNAPSHOT_FEATURES,
    "snapshot-merge": SNAPSHOT_FEATURES, "verity": VERITY_FEATURES,
}
_BASIC = (Linear, Striped, Zero, Error, ThinPool, Thin)

FORMAT = "dmimage-table"
VERSION = 1


def _fields_to_json(target: Any, style: Style) -> dict[str, Any]:
    """The newer targets: every dataclass field under its own name."""
    d: dict[str, Any] = {}
    for f in dataclasses.fields(target):
        v = getattr(target, f.name)
        if isinstance(v, CryptKey):
            d[f.name] = v.text(style.show_keys)
        elif f.name == "features" and target.type_name in _FEATURE_DEFS:
            d[f.name] = [feature_text(x, _FEATURE_DEFS[target.type_name]) for x in v]
        elif f.name == "classes":
            d[f.name] = [dataclasses.asdict(c) for c in v]
        elif isinstance(v, tuple):
            d[f.name] = list(v)
        else:
            d[f.name] = v
    return d


def target_to_json(target: Target, style: Style = DEFAULT_STYLE) -> dict[str, Any]:
    """The target's fields, without start and length (crypt keys redacted unless shown)."""
    d: dict[str, Any] = {"type": target.type_name}
    if not isinstance(target, (*_BASIC, Generic)):
        d.update(_fields_to_json(target, style))
        return d
    if isinstance(target, Linear):
        d.update(device=target.device, offset=target.offset)
    elif isinstance(target, Striped):
        d.update(chunk_size=target.chunk_size,
                 stripes=[{"device": s.device, "offset": s.offset} for s in target.stripes])
    elif isinstance(target, Error):
        if target.device is not None:
            d.update(device=target.device, offset=target.offset)
    elif isinstance(target, ThinPool):
        d.update(metadata_dev=target.metadata_dev, data_dev=target.data_dev,
                 data_block_size=target.data_block_size, low_water_mark=target.low_water_mark,
                 features=target.ordered_features())
    elif isinstance(target, Thin):
        d.update(pool_dev=target.pool_dev, dev_id=target.dev_id)
        if target.external_origin_dev is not None:
            d["external_origin_dev"] = target.external_origin_dev
    elif isinstance(target, Generic):
        d["params"] = target.params_text
    return d


def table_to_json(table: Table, style: Style = DEFAULT_STYLE) -> dict[str, Any]:
    """A JSON-ready dict: ``{"format", "version", "targets": [...]}``."""
    targets = []
    for e in table.entries:
        d: dict[str, Any] = {"start": e.start, "length": e.length}
        d.update(target_to_json(e.target, style))
        targets.append(d)
    return {"format": FORMAT, "version": VERSION, "targets": targets}


class _Reader:
    def __init__(self, obj: Any, where: int):
        if not isinstance(obj, dict):
            raise TableError("each target must be a JSON object", line=where)
        self.obj, self.where, self.used = obj, where, {"type", "start", "length"}
        self.type = obj.get("type")

    def fail(self, msg: str, key: str | None = None) -> TableError:
        return TableError(msg, line=self.where, field=key,
                          target=self.type if isinstance(self.type, str) else None)

    def integer(self, key: str, default: int | None = None, required: bool = True) -> Any:
        self.used.add(key)
        if key not in self.obj:
            if required:
                raise self.fail("missing", key)
            return default
        v = self.obj[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self.fail(f"must be a non-negative integer, not {v!r}", key)
        return v

    def string(self, key: str, required: bool = True) -> Any:
        self.used.add(key)
        if key not in self.obj:
            if required:
                raise self.fail("missing", key)
            return None
        v = self.obj[key]
        if not isinstance(v, str) or (not v and key != "params"):
            raise self.fail(f"must be a non-empty string, not {v!r}", key)
        return v

    def array(self, key: str) -> list[Any]:
        self.used.add(key)
        v = self.obj.get(key, [])
        if not isinstance(v, list):
            raise self.fail("must be a list", key)
        return v

    def done(self) -> None:
        extra = sorted(set(self.obj) - self.used)
        if extra:
            raise self.fail(f"unknown key {extra[0]!r}")


def _target(r: _Reader) -> Target:
    t = r.type
    if not isinstance(t, str) or not t:
        raise r.fail("missing or bad 'type'", "type")
    if t == "linear":
        return Linear(r.string("device"), r.integer("offset"))
    if t == "striped":
        stripes = []
        for k, s in enumerate(r.array("stripes")):
            sr = _Reader(s, r.where)
            sr.used = set()
            stripes.append(Stripe(sr.string("device"), sr.integer("offset")))
            try:
                sr.done()
            except TableError as exc:
                raise r.fail(f"stripe {k}: {exc.detail}", "stripes") from None
        return Striped(r.integer("chunk_size"), tuple(stripes))
    if t == "zero":
        return Zero()
    if t == "error":
        dev = r.string("device", required=False)
        off = r.integer("offset", required=dev is not None)
        if off is not None and dev is None:
            raise r.fail("offset without device", "offset")
        return Error(dev, off)
    if t == "thin-pool":
        feats = r.array("features")
        if not all(isinstance(f, str) for f in feats):
            raise r.fail("must be a list of strings", "features")
        if len(set(feats)) != len(feats):
            raise r.fail("repeated feature", "features")
        try:
            return ThinPool(r.string("metadata_dev"), r.string("data_dev"),
                            r.integer("data_block_size"), r.integer("low_water_mark"),
                            frozenset(feats))
        except TableError as exc:
            raise r.fail(exc.detail, "features") from None
    if t == "thin":
        return Thin(r.string("pool_dev"), r.integer("dev_id"),
                    r.string("external_origin_dev", required=False))
    if t in TYPED:
        return _fields_from_json(r, TYPED[t])
    params = r.string("params", required=False)
    try:
        return Generic(t, params or "")
    except TableError as exc:
        raise r.fail(exc.detail, exc.field) from None


def _fields_from_json(r: _Reader, cls: Any) -> Target:
    """The newer targets, field by field (the inverse of :func:`_fields_to_json`)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if kind == "int":
            values[f.name] = r.integer(f.name)
        elif kind == "str":
            if f.name in r.obj or required:
                values[f.name] = r.string(f.name)
            else:
                r.used.add(f.name)
        elif kind == "CryptKey":
            values[f.name] = CryptKey.parse(r.string(f.name), line=r.where)
        elif f.name == "classes":
            groups = []
            for c in r.array(f.name):
                cr = _Reader(c, r.where)
                cr.used = set()
                groups.append(DelayClass(cr.string("device"), cr.integer("offset"),
                                         cr.integer("delay_ms")))
                cr.done()
            values[f.name] = tuple(groups)
        else:
            items = r.array(f.name)
            if not all(isinstance(x, str) for x in items):
                raise r.fail("must be a list of strings", f.name)
            if f.name == "features" and r.type in _FEATURE_DEFS:
                values[f.name] = features_from_texts(items, _FEATURE_DEFS[r.type],
                                                     target=r.type, line=r.where)
            else:
                values[f.name] = tuple(items)
    result: Target = cls(**values)
    return result


def table_from_json(obj: Any) -> Table:
    """Build a Table from :func:`table_to_json`'s form (also accepts a bare target list)."""
    if isinstance(obj, dict):
        if obj.get("format", FORMAT) != FORMAT:
            raise TableError(f"not a {FORMAT} document (format {obj.get('format')!r})")
        if obj.get("version", VERSION) != VERSION:
            raise TableError(f"unsupported version {obj.get('version')!r} (this reads "
                             f"{VERSION})")
        extra = sorted(set(obj) - {"format", "version", "targets"})
        if extra:
            raise TableError(f"unknown key {extra[0]!r}")
        items = obj.get("targets")
    else:
        items = obj
    if not isinstance(items, list):
        raise TableError("'targets' must be a list")
    entries = []
    for i, item in enumerate(items, start=1):
        r = _Reader(item, i)
        start, length = r.integer("start"), r.integer("length")
        target = _target(r)
        r.done()
        entries.append(Entry(start, length, target))
    return Table(tuple(entries))
