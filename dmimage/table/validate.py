"""The rules a table must follow, each traced to the kernel code that enforces it.

Errors are what the kernel refuses when the table is loaded; warnings (``TableError.warning``)
are what it accepts but almost certainly is not meant (a pool whose tail is unusable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dmimage.table import kernel as K
from dmimage.table.args import KernelVersion
from dmimage.table.errors import TableError
from dmimage.table.model import Entry, Table
from dmimage.table.targets import Error, Linear, Striped, Target, Thin, ThinPool

#: dm-thin.c: thin-pool is DM_TARGET_SINGLETON | DM_TARGET_IMMUTABLE.
_SINGLETONS = {"thin-pool"}


def _err(msg: str, line: int, entry: Entry | None, field: str | None = None,
         warning: bool = False) -> TableError:
    return TableError(msg, line=line, field=field,
                      target=entry.type_name if entry is not None else None, warning=warning)


def _fits(device: str, offset: int, length: int, sizes: Mapping[str, int] | None, line: int,
          entry: Entry, field: str) -> Iterator[TableError]:
    """dm-table.c device_area_is_invalid(): the area must lie within the device."""
    if sizes is None or device not in sizes:
        return
    size = sizes[device]
    if offset + length > size:
        yield _err(f"{device} has {size} sectors; sectors {offset}..{offset + length - 1} "
                   "are beyond its end (dm-table.c: access beyond end of device)",
                   line, entry, field)


def _linear(t: Linear, e: Entry, line: int, sizes: Mapping[str, int] | None
            ) -> Iterator[TableError]:
    yield from _fits(t.device, t.offset, e.length, sizes, line, e, "device")


def _error(t: Error, e: Entry, line: int, sizes: Mapping[str, int] | None
           ) -> Iterator[TableError]:
    if t.device is not None and t.offset is not None:
        yield from _fits(t.device, t.offset, e.length, sizes, line, e, "device")


def _striped(t: Striped, e: Entry, line: int, sizes: Mapping[str, int] | None
             ) -> Iterator[TableError]:
    n = len(t.stripes)
    if n == 0:
        yield _err("stripe count must be at least 1 (dm-stripe.c: Invalid stripe count)",
                   line, e, "stripes")
        return
    if t.chunk_size == 0:
        yield _err("chunk size must not be 0 (dm-stripe.c: Invalid chunk_size)", line, e,
                   "chunk_size")
        return
    if e.length % n:
        yield _err(f"length {e.length} is not divisible by {n} stripes (dm-stripe.c: Target "
                   "length not divisible by number of stripes)", line, e, "length")
        return
    width = e.length // n
    if width % t.chunk_size:
        yield _err(f"length per stripe {width} is not a multiple of chunk size {t.chunk_size}"
                   f" (dm-stripe.c: Target length not divisible by chunk size); length must "
                   f"be a multiple of stripes x chunk = {n * t.chunk_size}", line, e, "length")
    if t.chunk_size < K.STRIPE_DOC_MIN_CHUNK:
        yield _err(f"chunk size {t.chunk_size} is below a 4 KiB page (striped.rst asks for at "
                   f"least PAGE_SIZE; dm-stripe.c does not refuse it)", line, e, "chunk_size",
                   warning=True)
    for k, s in enumerate(t.stripes):
        yield from _fits(s.device, s.offset, width, sizes, line, e, f"stripe {k} device")


def _thin_pool(t: ThinPool, e: Entry, line: int, sizes: Mapping[str, int] | None
               ) -> Iterator[TableError]:
    bs = t.data_block_size
    if not (K.MIN_DATA_BLOCK_SECTORS <= bs <= K.MAX_DATA_BLOCK_SECTORS
            and bs % K.MIN_DATA_BLOCK_SECTORS == 0):
        yield _err(f"{bs} sectors: must be a multiple of {K.MIN_DATA_BLOCK_SECTORS} between "
                   f"{K.MIN_DATA_BLOCK_SECTORS} and {K.MAX_DATA_BLOCK_SECTORS} (64 KiB .. 1 GiB;"
                   " dm-thin.c pool_ctr: Invalid block size)", line, e, "data_block_size")
        bs = 0
    if t.metadata_dev == t.data_dev:
        yield _err("metadata and data devices are the same (dm-thin.c pool_ctr: Error setting "
                   "metadata or data device)", line, e, "data_dev")
    if len(t.features) > K.POOL_MAX_FEATURE_ARGS:
        yield _err(f"{len(t.features)} feature arguments; the kernel takes at most "
                   f"{K.POOL_MAX_FEATURE_ARGS} (dm-thin.c parse_pool_features: Invalid number "
                   "of pool feature arguments)", line, e, "features")
    if bs:
        blocks = e.length // bs
        if e.length % bs:
            yield _err(f"length {e.length} is not a multiple of the block size {bs}: the last "
                       f"{e.length % bs} sectors are never used", line, e, "length",
                       warning=True)
        if blocks == 0:
            yield _err(f"length {e.length} is less than one data block ({bs} sectors)", line,
                       e, "length")
        elif t.low_water_mark > blocks:
            yield _err(f"low water mark {t.low_water_mark} blocks exceeds the pool's {blocks} "
                       "blocks: the low-water event fires at once", line, e, "low_water_mark",
                       warning=True)
    # pool_iterate_devices(): the data device must cover the target's length.
    yield from _fits(t.data_dev, 0, e.length, sizes, line, e, "data_dev")
    if sizes is not None and t.metadata_dev in sizes:
        msize = sizes[t.metadata_dev]
        if msize > K.THIN_METADATA_MAX_SECTORS:
            yield _err(f"metadata device {t.metadata_dev} has {msize} sectors; only "
                       f"{K.THIN_METADATA_MAX_SECTORS} are used", line, e, "metadata_dev",
                       warning=True)


def _thin(t: Thin, e: Entry, line: int, sizes: Mapping[str, int] | None
          ) -> Iterator[TableError]:
    if t.dev_id > K.MAX_DEV_ID:
        yield _err(f"{t.dev_id} is above {K.MAX_DEV_ID} (24-bit ids; dm-thin.c read_dev_id: "
                   "Invalid device id)", line, e, "dev_id")
    if t.external_origin_dev is not None and t.external_origin_dev == t.pool_dev:
        yield _err("external origin is the pool device (dm-thin.c thin_ctr: Error setting "
                   "origin device)", line, e, "external_origin_dev")


#: Per target type, its checker (called with a target of that type; ``Generic`` ones skipped).
_Check = Callable[[Any, Entry, int, Mapping[str, int] | None], Iterator[TableError]]
_CHECKS: dict[str, _Check] = {"linear": _linear, "striped": _striped, "thin-pool": _thin_pool,
                              "thin": _thin, "error": _error}


def _modelled(t: Any, e: Entry, line: int, sizes: Mapping[str, int] | None,
              kernel: KernelVersion | None) -> Iterator[TableError]:
    """Targets that carry their own rules (crypt, delay, flakey, snapshot*, verity, cache, era)."""
    for field, msg, warning in t.rules(e.length, kernel):
        yield _err(msg, line, e, field, warning)
    for field, device, offset, length in t.areas(e.length):
        yield from _fits(device, offset, length, sizes, line, e, field)


def table_problems(table: Table, sizes: Mapping[str, int] | None = None,
                   kernel: KernelVersion | None = None) -> list[TableError]:
    """All problems, in line order. ``kernel`` (major, minor) applies that kernel's limits
    where they differ (features and rules that changed from 5.10 to 7.x); None means the
    newest we know."""
    out: list[TableError] = []
    if not table.entries:
        out.append(TableError("a table needs at least one target (dm-ioctl.c: no targets "
                              "specified)"))
        return out
    # dm-table.c validate_hardware_logical_block_alignment(): every line boundary must be a
    # multiple of the device's logical block size, which crypt (sector_size) and verity (data
    # block size) raise; the backing devices' own sizes are not known here (512 assumed).
    lbs = max((getattr(e.target, "logical_block_sectors", lambda: 1)()
               for e in table.entries), default=1)
    expected = 0
    for i, e in enumerate(table.entries):
        line = table.line_of(i)
        if e.start != expected:
            if i == 0:
                msg = f"the first line must start at sector 0, not {e.start}"
            elif e.start > expected:
                msg = f"gap: starts at {e.start}, the previous line ends at {expected}"
            else:
                msg = f"overlap: starts at {e.start}, the previous line ends at {expected}"
            out.append(_err(msg + " (dm-table.c: Gap in table)", line, e, "start"))
        if e.length == 0:
            out.append(_err("zero-length target (dm-table.c)", line, e, "length"))
        if lbs > 1 and (e.start + e.length) % lbs:
            out.append(_err(f"ends at sector {e.start + e.length}, not a multiple of the "
                            f"table's logical block size ({lbs * 512} bytes) (dm-table.c: not "
                            "aligned to h/w logical block size)", line, e, "length"))
        if e.start + e.length > K.SECTOR_MAX:
            out.append(_err("ends beyond 2^64 sectors", line, e, "length"))
        if e.type_name in _SINGLETONS and len(table.entries) > 1:
            out.append(_err(f"{e.type_name} must be the only line of its table (dm-table.c: "
                            "singleton target type must appear alone in table)", line, e))
        target: Target = e.target
        check = _CHECKS.get(e.type_name)
        if check is not None and type(target).__name__ != "Generic":
            out.extend(check(target, e, line, sizes))
        elif hasattr(target, "rules"):
            out.extend(_modelled(target, e, line, sizes, kernel))
        expected = e.start + e.length
    return out
