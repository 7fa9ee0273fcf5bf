"""Build specs (`images/*.toml`): parsed strictly, every error named by its key path.

See docs/build.md for the format. :func:`load_spec` reads and validates a spec completely
(files exist, sizes fit, ids unique, snapshot chains acyclic) before anything is written;
errors are :class:`SpecError` (exit 1) or :class:`SpecFileError` (a file the spec names is
missing or unreadable, exit 2), and ``str()`` starts with the key path, e.g.
``volumes[2].content: file not found: x.img``.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmimage.errors import DmimageError
from dmimage.format.constants import MAX_DEV_ID, SECTOR_SIZE
from dmimage.table.kernel import POOL_FEATURES

#: Namespace of every uuid5 a build derives (PARTUUIDs, disk GUID, ext4 UUIDs, hash seeds).
BUILD_NAMESPACE = uuid.UUID("d5edd51c-e019-46a6-b31a-cecb375a55b3")

MiB = 1 << 20
DEFAULT_BLOCK_SIZE = 64 << 10
DEFAULT_EPOCH = 1577836800  # 2020-01-01T00:00:00Z
MIN_BLOCK, MAX_BLOCK = 64 << 10, 1 << 30
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class SpecError(DmimageError):
    """The spec is invalid; ``path`` is the key path (``volumes[2].size``)."""

    exit_code = 1

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class SpecFileError(SpecError):
    """A file or directory the spec names is missing or unreadable."""

    exit_code = 2


_UNITS = {"": 1, "b": 1, "s": SECTOR_SIZE, "k": 1 << 10, "kib": 1 << 10, "m": MiB,
          "mib": MiB, "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(value: Any, path: str) -> int:
    """An integer (bytes) or a string like ``"64KiB"``, ``"32M"``, ``"2048s"`` (binary units;
    ``s`` = 512-byte sectors) → bytes."""
    if isinstance(value, bool):
        raise SpecError(path, f"expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise SpecError(path, f"bad size {value!r} (use bytes or a number with KiB, MiB, "
                            "GiB, TiB, K, M, G, T or s)")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise SpecError(path, f"expected a size, got {type(value).__name__} {value!r}")
    if n < 0:
        raise SpecError(path, "size must not be negative")
    return n


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


# --------------------------------------------------------------------------------------------
# model


@dataclass
class Ext4Content:
    dirs: list[Path]
    label: str
    uuid: str
    hash_seed: str
    path: str  # key path, for errors found while building

    kind = "ext4"


@dataclass
class RawContent:
    file: Path
    size: int
    path: str

    kind = "raw"


Content = Ext4Content | RawContent | None


@dataclass
class Volume:
    index: int
    name: str
    id: int
    size: int
    origin: str | None
    content: Content
    dm_name: str

    @property
    def key(self) -> str:
        return f"volumes[{self.index}]"


@dataclass
class LinearVolume:
    """``type = "linear"`` (layout = "lvm" only): a plain LV of the VG, its content written
    straight into its extents."""

    index: int
    name: str
    size: int
    content: Content

    @property
    def key(self) -> str:
        return f"volumes[{self.index}]"


@dataclass
class PoolSpec:
    name: str
    data_block_size: int  # bytes
    data_size: int  # bytes, a multiple of data_block_size
    metadata_size: int  # bytes, a multiple of 4 KiB
    transaction_id: int
    features: list[str]
    low_water_mark: int

    @property
    def block_sectors(self) -> int:
        return self.data_block_size // SECTOR_SIZE

    @property
    def nr_data_blocks(self) -> int:
        return self.data_size // self.data_block_size


@dataclass
class LvmSpec:
    """``layout = "lvm"``: one GPT partition holding a PV, a VG with the thin pool in it."""

    vg: str
    extent_size: int  # bytes
    pmspare_size: int = 0  # bytes (lvm2's choice: the metadata LV's size, at most 16 GiB)


@dataclass
class Spec:
    source: Path
    name: str
    layout: str  # "gpt" | "files" | "lvm"
    image_size: int | None
    pool: PoolSpec
    volumes: list[Volume]  # in creation order (every origin before its snapshots)
    source_date_epoch: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    lvm: LvmSpec | None = None
    linear: list[LinearVolume] = field(default_factory=list)

    def volume(self, name: str) -> Volume:
        return next(v for v in self.volumes if v.name == name)

    def uuid5(self, what: str) -> uuid.UUID:
        return uuid.uuid5(BUILD_NAMESPACE, f"{self.name}\0{what}")


# --------------------------------------------------------------------------------------------
# reading


class _Table:
    """One TOML table: typed getters that record which keys were used."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise SpecError(path, f"expected a table, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, default: Any = None) -> Any:
        self.used.add(k)
        return self.data.get(k, default)

    def has(self, k: str) -> bool:
        return k in self.data

    def str_(self, k: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.get(k)
        if v is None:
            if required:
                raise SpecError(self.key(k), "missing (required)")
            return default
        if not isinstance(v, str):
            raise SpecError(self.key(k), f"expected a string, got {v!r}")
        return v

    def int_(self, k: str, default: int | None = None, *, required: bool = False,
             lo: int = 0, hi: int = (1 << 64) - 1) -> int | None:
        v = self.get(k)
        if v is None:
            if required:
                raise SpecError(self.key(k), "missing (required)")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(self.key(k), f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise SpecError(self.key(k), f"{v} is outside {lo}..{hi}")
        return v

    def size(self, k: str, default: int | None = None, *, required: bool = False
             ) -> int | None:
        v = self.get(k)
        if v is None:
            if required:
                raise SpecError(self.key(k), "missing (required)")
            return default
        return parse_size(v, self.key(k))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise SpecError(self.key(unknown[0]), f"unknown key (known here: "
                            f"{', '.join(sorted(self.used))})")


def _path(base: Path, text: str, key: str, *, want_dir: bool) -> Path:
    p = (base / text) if not os.path.isabs(text) else Path(text)
    if not p.exists():
        raise SpecFileError(key, f"{'directory' if want_dir else 'file'} not found: {text}")
    if want_dir and not p.is_dir():
        raise SpecFileError(key, f"not a directory: {text}")
    if not want_dir and not p.is_file():
        raise SpecFileError(key, f"not a regular file: {text}")
    if not os.access(p, os.R_OK):
        raise SpecFileError(key, f"not readable: {text}")
    return p


def _content(t: _Table, base: Path, spec_name: str, vol_name: str, root_name: str
             ) -> Content:
    key = t.key("content")
    v = t.get("content")
    if v is None:
        return None
    if isinstance(v, str):
        f = _path(base, v, key, want_dir=False)
        return RawContent(f, f.stat().st_size, key)
    c = _Table(v, key)
    kind = c.str_("type", required=True)
    if kind == "raw":
        name = c.str_("file", required=True)
        assert name is not None
        f = _path(base, name, c.key("file"), want_dir=False)
        c.done()
        return RawContent(f, f.stat().st_size, c.key("file"))
    if kind == "ext4":
        dirs = c.get("dirs")
        if isinstance(dirs, str):
            dirs = [dirs]
        if not isinstance(dirs, list) or not dirs or not all(isinstance(d, str) for d in dirs):
            raise SpecError(c.key("dirs"), "expected a directory or a non-empty list of "
                            "directories")
        paths = [_path(base, d, f"{c.key('dirs')}[{i}]", want_dir=True)
                 for i, d in enumerate(dirs)]
        label = c.str_("label", vol_name[:16])
        assert label is not None
        if len(label.encode()) > 16:
            raise SpecError(c.key("label"), "an ext4 label has at most 16 bytes")
        # Layers of one chain share the root's UUID and hash seed: a layer is the same
        # filesystem, changed (and identical metadata blocks stay shared).
        fs_uuid = c.str_("uuid") or str(uuid.uuid5(BUILD_NAMESPACE,
                                                   f"{spec_name}\0ext4\0{root_name}"))
        seed = c.str_("hash_seed") or str(uuid.uuid5(BUILD_NAMESPACE,
                                                     f"{spec_name}\0hash\0{root_name}"))
        for k, u in (("uuid", fs_uuid), ("hash_seed", seed)):
            try:
                uuid.UUID(u)
            except ValueError:
                raise SpecError(c.key(k), f"not a UUID: {u!r}") from None
        c.done()
        return Ext4Content(paths, label, fs_uuid, seed, key)
    raise SpecError(c.key("type"), f"unknown content type {kind!r} (raw or ext4)")


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a spec; raises SpecError/SpecFileError naming the key."""
    src = Path(path)
    try:
        text = src.read_bytes().decode()
    except FileNotFoundError:
        raise SpecFileError("", f"{src}: spec file not found") from None
    except OSError as exc:
        raise SpecFileError("", f"{src}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError("", f"{src}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("", f"{src}: TOML syntax: {exc}") from None
    return parse_spec(data, src.resolve().parent, src)


def parse_spec(data: dict[str, Any], base: Path, source: Path | None = None) -> Spec:
    top = _Table(data, "")
    name = top.str_("name", required=True)
    assert name is not None
    if not NAME_RE.match(name):
        raise SpecError("name", f"{name!r}: use 1-64 letters, digits, '_', '.', '+', '-'")
    layout = top.str_("layout", "gpt")
    if layout not in ("gpt", "files", "lvm"):
        raise SpecError("layout", f"{layout!r}: must be \"gpt\", \"files\" or \"lvm\"")
    image_size = top.size("image_size")
    if image_size is not None and layout == "files":
        raise SpecError("image_size", "only for layout = \"gpt\" or \"lvm\"")
    epoch = top.int_("source_date_epoch", DEFAULT_EPOCH, lo=1, hi=(1 << 32) - 1)
    assert epoch is not None

    # -- volumes -------------------------------------------------------------------------
    raw_vols = top.get("volumes")
    if raw_vols is None or not isinstance(raw_vols, list) or not raw_vols:
        raise SpecError("volumes", "missing: give at least one [[volumes]] table")
    all_tables = [_Table(v, f"volumes[{i}]") for i, v in enumerate(raw_vols)]
    linear_tables: list[tuple[int, _Table]] = []
    for i, t in enumerate(all_tables):
        kind = t.str_("type", "thin")
        if kind not in ("thin", "linear"):
            raise SpecError(t.key("type"), f"{kind!r}: must be \"thin\" or \"linear\"")
        if kind == "linear":
            if layout != "lvm":
                raise SpecError(t.key("type"), "linear volumes need layout = \"lvm\"")
            linear_tables.append((i, t))
    linear_idx = {i for i, _ in linear_tables}
    tables = {i: t for i, t in enumerate(all_tables) if i not in linear_idx}
    if not tables:
        raise SpecError("volumes", "give at least one thin volume (the pool needs one)")
    names: dict[str, int] = {}
    ids: dict[int, int] = {}
    for i, t in linear_tables:
        vname = t.str_("name", required=True)
        assert vname is not None
        if not NAME_RE.match(vname):
            raise SpecError(t.key("name"), f"{vname!r}: use 1-64 letters, digits, '_', '.', "
                            "'+', '-'")
        if vname in names:
            raise SpecError(t.key("name"), f"duplicate name {vname!r} (also volumes"
                            f"[{names[vname]}])")
        names[vname] = i
    for i, t in tables.items():
        vname = t.str_("name", required=True)
        assert vname is not None
        if not NAME_RE.match(vname):
            raise SpecError(t.key("name"), f"{vname!r}: use 1-64 letters, digits, '_', '.', "
                            "'+', '-'")
        if vname in names:
            raise SpecError(t.key("name"), f"duplicate name {vname!r} (also volumes"
                            f"[{names[vname]}])")
        names[vname] = i
        vid = t.int_("id", required=True, hi=MAX_DEV_ID)
        assert vid is not None
        if vid in ids:
            raise SpecError(t.key("id"), f"duplicate id {vid} (also volumes[{ids[vid]}])")
        ids[vid] = i
    origins: dict[int, str | None] = {}
    for i, t in tables.items():
        o = t.str_("origin")
        if o is not None and (o not in names or names[o] not in tables):
            raise SpecError(t.key("origin"), f"no volume named {o!r}" if o not in names
                            else f"{o!r} is a linear volume, not a thin one")
        origins[i] = o
    # cycles, and the creation order (origins first, then spec order)
    order: list[int] = []
    state: dict[int, int] = {}

    def visit(i: int, chain: list[int]) -> None:
        if state.get(i) == 2:
            return
        if state.get(i) == 1:
            cyc = chain[chain.index(i):] + [i]
            names_ = " -> ".join(tables[j].data["name"] for j in cyc)
            raise SpecError(f"volumes[{i}].origin", f"snapshot cycle: {names_}")
        state[i] = 1
        o = origins[i]
        if o is not None:
            visit(names[o], chain + [i])
        state[i] = 2
        order.append(i)

    for i in tables:
        visit(i, [])

    def root_of(i: int) -> str:
        while origins[i] is not None:
            i = names[origins[i]]  # type: ignore[index]
        name: str = tables[i].data["name"]
        return name

    vols: dict[int, Volume] = {}
    for i in order:
        t = tables[i]
        vname = t.data["name"]
        o = origins[i]
        size = t.size("size")
        if size is None:
            if o is None:
                raise SpecError(t.key("size"), "missing (required unless the volume has an "
                                "origin)")
            size = vols[names[o]].size
        if size == 0 or size % SECTOR_SIZE:
            raise SpecError(t.key("size"), f"{size} bytes: must be a positive multiple of 512")
        content = _content(t, base, name, vname, root_of(i))
        if isinstance(content, RawContent) and content.size > size:
            raise SpecError(content.path, f"{content.file.name} is {content.size} bytes, "
                            f"larger than the volume ({size} bytes)")
        if isinstance(content, Ext4Content) and size < 1 * MiB:
            raise SpecError(t.key("size"), "an ext4 volume needs at least 1MiB")
        dm_name = t.str_("dm_name", f"{name}-{vname}")
        assert dm_name is not None
        t.done()
        vols[i] = Volume(i, vname, t.data["id"], size, o, content, dm_name)

    linear: list[LinearVolume] = []
    for i, t in linear_tables:
        vname = t.data["name"]
        size = t.size("size", required=True)
        assert size is not None
        if size == 0 or size % SECTOR_SIZE:
            raise SpecError(t.key("size"), f"{size} bytes: must be a positive multiple of 512")
        content = _content(t, base, name, vname, vname)
        if isinstance(content, RawContent) and content.size > size:
            raise SpecError(content.path, f"{content.file.name} is {content.size} bytes, "
                            f"larger than the volume ({size} bytes)")
        if isinstance(content, Ext4Content) and size < 1 * MiB:
            raise SpecError(t.key("size"), "an ext4 volume needs at least 1MiB")
        t.done()
        linear.append(LinearVolume(i, vname, size, content))

    # -- pool ----------------------------------------------------------------------------
    p = _Table(top.get("pool", {}), "pool")
    pname = p.str_("name", f"{name}-pool")
    assert pname is not None
    bs = p.size("data_block_size", DEFAULT_BLOCK_SIZE)
    assert bs is not None
    if bs % MIN_BLOCK or not MIN_BLOCK <= bs <= MAX_BLOCK:
        raise SpecError(p.key("data_block_size"), f"{bs} bytes: must be a multiple of 64KiB "
                        "between 64KiB and 1GiB")
    total_virtual = sum(v.size for v in vols.values())
    data_size = p.size("data_size")
    if data_size is None:
        data_size = -(-total_virtual // bs) * bs
    elif data_size % bs or data_size == 0:
        raise SpecError(p.key("data_size"), f"{human(data_size)} is not a positive multiple "
                        f"of the data block size ({human(bs)})")
    nr_blocks = data_size // bs
    from dmimage.thin.metadata_size import metadata_size as estimate

    need = estimate(bs, max(data_size, bs), len(vols))
    meta = p.size("metadata_size")
    meta_given = meta is not None
    if meta is None:
        meta = max(4 * MiB, -(-2 * need // MiB) * MiB)
    elif meta % 4096:
        raise SpecError(p.key("metadata_size"), "must be a multiple of 4KiB")
    elif meta < max(need, 64 << 10):
        raise SpecError(p.key("metadata_size"), f"{human(meta)} is too small for "
                        f"{nr_blocks} data blocks and {len(vols)} volumes: at least "
                        f"{human(max(need, 64 << 10))}")
    tid = p.int_("transaction_id", 0)
    assert tid is not None
    feats = p.get("features", [])
    if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
        raise SpecError(p.key("features"), "expected a list of strings")
    for j, f in enumerate(feats):
        if f not in POOL_FEATURES:
            raise SpecError(f"{p.key('features')}[{j}]", f"unknown feature {f!r} (known: "
                            f"{', '.join(POOL_FEATURES)})")
    if len(set(feats)) > 4:
        raise SpecError(p.key("features"), "the kernel takes at most 4 feature arguments")
    lwm = p.int_("low_water_mark", 0, hi=nr_blocks)
    assert lwm is not None
    p.done()
    lvm = None
    if layout == "lvm":
        lt = _Table(top.get("lvm", {}), "lvm")
        vgname = lt.str_("vg", re.sub(r"[^A-Za-z0-9+_.-]", "_", name))
        assert vgname is not None
        if not re.fullmatch(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}", vgname):
            raise SpecError(lt.key("vg"), f"{vgname!r}: not a valid VG name")
        ext = lt.size("extent_size", 4 * MiB)
        assert ext is not None
        if ext < 64 << 10 or ext & (ext - 1):
            raise SpecError(lt.key("extent_size"), f"{human(ext)}: a power of 2, at least "
                            "64KiB")
        lt.done()
        # lvcreate rounds sizes up to whole extents; the pool's data LV also to whole blocks
        unit = ext * bs // math.gcd(ext, bs)
        data_size = -(-data_size // unit) * unit
        # _tmeta and the spare as lvm2 sizes them (dmimage/lvm/sizing.py); without a
        # metadata_size, lvm2's estimate, raised to what the content needs when that is more
        from dmimage.lvm.sizing import pmspare_extents, thin_pool_sizes

        sizes = thin_pool_sizes(data_size // ext, ext // SECTOR_SIZE, bs // SECTOR_SIZE,
                                meta // SECTOR_SIZE if meta_given else None)
        lvm2_meta = sizes.tmeta_extents * ext
        meta = lvm2_meta if meta_given else max(lvm2_meta, -(-need // ext) * ext)
        spare = pmspare_extents(meta // ext, ext // SECTOR_SIZE) * ext
        sized: list[Volume | LinearVolume] = [*vols.values(), *linear]
        for v in sized:
            if v.size % ext:
                raise SpecError(f"{v.key}.size", f"{human(v.size)} is not a multiple of the "
                                f"extent size ({human(ext)}), as lvm2 needs")
        lvm = LvmSpec(vgname, ext, spare)
        if image_size is not None:
            lin = sum(v.size for v in linear)
            need = 2 * MiB + -(-(MiB + meta + spare + data_size + lin) // MiB) * MiB
            if image_size < need or image_size % SECTOR_SIZE:
                raise SpecError("image_size", f"{human(image_size)}: the GPT and a PV of the "
                                f"pool need {human(need)}, a multiple of 512")
    elif top.get("lvm") is not None:
        raise SpecError("lvm", "only for layout = \"lvm\"")
    pool = PoolSpec(pname, bs, data_size, meta, tid, sorted(set(feats),
                    key=POOL_FEATURES.index), lwm)
    dm_names = {pname: "pool.name"}
    for v in vols.values():
        if v.dm_name in dm_names:
            raise SpecError(f"{v.key}.dm_name", f"device name {v.dm_name!r} is also used by "
                            f"{dm_names[v.dm_name]}")
        dm_names[v.dm_name] = f"{v.key}"

    if layout == "gpt" and image_size is not None:
        from dmimage.image.gpt import plan_layout

        plan = plan_layout(meta, data_size)
        if image_size < plan.disk_bytes:
            raise SpecError("image_size", f"{human(image_size)} does not fit: the GPT, "
                            f"{human(meta)} of metadata and {human(data_size)} of data need "
                            f"{human(plan.disk_bytes)}")
        if image_size % SECTOR_SIZE:
            raise SpecError("image_size", "must be a multiple of 512")
    top.done()
    return Spec(source or base / "spec.toml", name, layout, image_size, pool,
                [vols[i] for i in order], epoch, data, lvm, linear)
