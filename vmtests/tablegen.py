"""Seeded random device-mapper tables for the guest round trips (vmtests/test_tables_guest.py).

``valid()`` draws tables the kernel must load on the backing the guest set up (a raw scratch
disk, fresh zeroed helper devices for metadata and COW stores, a live pool with thin ids);
``invalid_cases()`` draws near misses, each breaking (or, for a few, just respecting) one rule,
so `dmimage table check` and the kernel can be compared case by case. Everything is drawn
from one ``random.Random(seed)``: the seed printed by the test replays a run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dmimage.table import Entry, Table
from dmimage.table.args import KernelVersion, Style, at_least
from dmimage.table.cache import Cache, Era
from dmimage.table.crypt import Crypt
from dmimage.table.cryptkey import CryptKey
from dmimage.table.faults import Delay, DelayClass, Flakey
from dmimage.table.snapshot import Snapshot, SnapshotMerge, SnapshotOrigin
from dmimage.table.targets import Error, Linear, Stripe, Striped, Target, Thin, ThinPool, Zero
from dmimage.table.text import format_table
from dmimage.table.verity import Verity

#: Every target type `dmimage table` models, in the order the test reports them.
TARGET_TYPES = ("linear", "striped", "zero", "error", "thin-pool", "thin", "crypt", "delay",
                "flakey", "snapshot-origin", "snapshot", "snapshot-merge", "verity", "cache",
                "era")
#: Near misses a kernel series must not load in the shared guest (a kernel bug: an oops or a
#: WARNING on a table every kernel refuses): label -> (series, what happens). Each is loaded
#: in a guest of its own and pinned by the named test of vmtests/test_kernel_quirks.py.
KERNEL_BUGS: dict[str, tuple[KernelVersion, str]] = {
    "snapshot-merge: transient store": (
        (5, 10), "oops (NULL pointer from snapshot_merge_next_chunks): "
        "test_snapshot_merge_transient_store"),
    **{label: ((5, 10), "WARNING in __flush_work from cache_ctr's error path: "
               "test_cache_ctr_error_path")
       for label in ("cache: unknown policy", "cache: odd policy args",
                     "cache: unknown policy key")},
}

#: Targets that may share a table with other lines in a generated multi-line table.
_STACKABLE = ("linear", "striped", "zero", "error", "crypt", "delay", "flakey")


@dataclass
class Backing:
    """What the guest has ready (all devices as ``major:minor``)."""

    kernel: KernelVersion
    disk: str
    disk_sectors: int
    helpers: list[str]
    helper_sectors: int
    pool: str
    thin_ids: int
    #: keyring keys loaded in the guest: (``type:description``, size in bytes)
    keys: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Case:
    """One table for the guest; ``label`` says which rule it exercises."""

    label: str
    table: Table
    readonly: bool = False
    text: str | None = None  # raw text, when the case is about the text form itself

    def render(self) -> str:
        return self.text if self.text is not None else format_table(
            self.table, Style(show_keys=True))


def _hex(rng: random.Random, nbytes: int) -> str:
    return rng.randbytes(nbytes).hex()


class Generator:
    """Draws tables against one :class:`Backing`."""

    def __init__(self, rng: random.Random, backing: Backing) -> None:
        self.rng = rng
        self.b = backing
        self._next_helper = 0

    # resources ------------------------------------------------------------------------------
    def helper(self) -> str:
        """A fresh zeroed device nobody else uses (metadata, COW, merge origin)."""
        if self._next_helper >= len(self.b.helpers):
            raise RuntimeError("out of helper devices: raise HELPERS in the test")
        h = self.b.helpers[self._next_helper]
        self._next_helper += 1
        return h

    def reuse_helpers(self) -> None:
        """Hand out the helpers from the first again (the caller removed every table on
        them and zeroed them)."""
        self._next_helper = 0

    def length(self, unit: int = 8, most: int = 4096) -> int:
        return unit * self.rng.randint(1, max(1, most // unit))

    def offset(self, length: int, align: int = 1) -> int:
        room = self.b.disk_sectors - length
        return align * self.rng.randint(0, room // align)

    # one line of each type ------------------------------------------------------------------
    def target(self, kind: str, length: int) -> Target:
        """A valid target of *kind* for a line of *length* sectors (length suits *kind*)."""
        r, d = self.rng, self.b.disk
        if kind == "linear":
            return Linear(d, self.offset(length))
        if kind == "striped":
            n = r.choice(self._stripes_for(length))
            chunk = self._chunk_for(length, n)
            return Striped(chunk, tuple(Stripe(d, self.offset(length // n)) for _ in range(n)))
        if kind == "zero":
            return Zero()
        if kind == "error":
            return Error() if r.random() < 0.5 else Error(d, self.offset(length))
        if kind == "crypt":
            return self._crypt(length)
        if kind == "delay":
            groups = r.choice((1, 2, 3))
            return Delay(tuple(DelayClass(d, self.offset(length), r.randint(0, 100))
                               for _ in range(groups)))
        if kind == "flakey":
            return self._flakey(length)
        if kind == "snapshot-origin":
            return SnapshotOrigin(d)
        raise ValueError(kind)

    def _stripes_for(self, length: int) -> list[int]:
        return [n for n in (1, 2, 4) if length % (n * 8) == 0] or [1]

    def _chunk_for(self, length: int, n: int) -> int:
        width = length // n
        chunks = [c for c in (8, 16, 24, 64, 128) if width % c == 0]
        return self.rng.choice(chunks) if chunks else 8

    def _crypt(self, length: int) -> Crypt:
        r = self.rng
        feats: list[tuple[str, ...]] = []
        for name in ("allow_discards", "same_cpu_crypt", "submit_from_crypt_cpus",
                     "no_read_workqueue", "no_write_workqueue", "iv_large_sectors"):
            if r.random() < 0.3:
                feats.append((name,))
        if at_least(self.b.kernel, (6, 12)) and r.random() < 0.3:
            feats.append(("high_priority",))
        sector = 512
        if r.random() < 0.4:
            sector = r.choice([s for s in (512, 1024, 2048, 4096) if length % (s // 512) == 0])
            feats.append(("sector_size", str(sector)))
        iv_offset = (sector // 512) * r.randint(0, 1000)
        cipher, sizes = r.choice((("aes-xts-plain64", (32, 64)),
                                  ("aes-cbc-essiv:sha256", (16, 24, 32)),
                                  ("aes-cbc-plain64", (16, 24, 32)),
                                  ("aes-xts-plain", (32, 64)),
                                  ("cipher_null-ecb", (0,))))
        size = r.choice(sizes)
        keyring = [k for k in self.b.keys if k[1] in sizes and k[1]]
        if size == 0:
            key = CryptKey.none()
        elif keyring and r.random() < 0.4:
            name, ksize = r.choice(keyring)
            ktype, _, desc = name.partition(":")
            key = CryptKey.keyring(ksize, ktype, desc)
        else:
            key = CryptKey.from_hex(_hex(r, size) if r.random() < 0.8
                                    else _hex(r, size).upper())
        return Crypt(cipher, key, iv_offset, self.b.disk, self.offset(length, sector // 512),
                     tuple(feats))

    def _flakey(self, length: int) -> Flakey:
        r = self.rng
        up, down = r.randint(0, 10), r.randint(0, 10)
        if up + down == 0:
            up = 1
        feats: list[tuple[str, ...]] = []
        new = at_least(self.b.kernel, (6, 12))
        write_flag = r.choice((None, "drop_writes", "error_writes"))
        if write_flag:
            feats.append((write_flag,))
        if new and r.random() < 0.3:
            feats.append(("error_reads",))
        # 6.16 refuses a fault together with a corruption of the same direction
        strict = at_least(self.b.kernel, (6, 16))
        error_reads = ("error_reads",) in feats
        if r.random() < 0.4:
            direction = "r" if write_flag else r.choice("rw")
            corrupt = ("corrupt_bio_byte", str(r.randint(1, 4096)), direction,
                       str(r.randint(0, 255)), str(r.choice((0, 1, 32))))
            if not (strict and error_reads and direction == "r"):
                feats.append(corrupt)
        if new and r.random() < 0.3:
            kind = r.choice(("random_read_corrupt", "random_write_corrupt"))
            # 0 is "not set": not printed, and no fault (kernel_form must know that)
            rate = 0 if r.random() < 0.25 else r.randint(1, 1_000_000_000)
            hidden = error_reads if kind == "random_read_corrupt" else write_flag is not None
            if not (strict and hidden and rate):
                feats.append((kind, str(rate)))
        return Flakey(self.b.disk, self.offset(length), up, down, tuple(feats))

    def _snapshot(self, merge: bool) -> tuple[int, Snapshot]:
        r = self.rng
        store = "P" if merge else r.choice(("P", "PO", "N"))
        chunk = r.choice((8, 16, 32, 64, 128))
        feats: list[tuple[str, ...]] = []
        if r.random() < 0.5:
            feats.append(("discard_zeroes_cow",))
            if r.random() < 0.5:
                feats.append(("discard_passdown_origin",))
        if at_least(self.b.kernel, (7, 0)):
            # 7.3 oopses loading discard_zeroes_cow in snapshot and snapshot-merge tables
            # (test_kernel_quirks.py); the draws above keep seeds stable
            feats = []
        cow = self.helper()
        if merge:
            origin, most = self.helper(), self.b.helper_sectors
            return self.length(8, most), SnapshotMerge(origin, cow, store, chunk, tuple(feats))
        length = self.length(8)
        return length, Snapshot(self.b.disk, cow, store, chunk, tuple(feats))

    def _verity(self) -> tuple[int, Verity]:
        r = self.rng
        dbs = r.choice((512, 1024, 2048, 4096))
        hbs = r.choice((512, 1024, 2048, 4096))
        per = dbs // 512
        blocks = r.randint(1, 64)
        length = per * r.randint(1, blocks)
        alg, digest_bytes = r.choice((("sha256", 32), ("sha1", 20)))
        salt = r.choice(("-", _hex(r, r.randint(1, 32))))
        version = r.choice((0, 1))
        # hash tree: at most one level below the root for 64 blocks (128 digests a block
        # or more at 512 bytes): a few blocks after hash_start
        hash_start = r.randint(0, (self.b.disk_sectors * 512 // hbs) - 64)
        feats: list[tuple[str, ...]] = []
        mode = r.choice((None, "ignore_corruption", "restart_on_corruption",
                         "panic_on_corruption"))
        if mode:
            feats.append((mode,))
        if at_least(self.b.kernel, (6, 12)) and r.random() < 0.3:
            feats.append((r.choice(("restart_on_error", "panic_on_error")),))
        for flag in ("ignore_zero_blocks", "check_at_most_once", "try_verify_in_tasklet"):
            if r.random() < 0.3 and (flag != "try_verify_in_tasklet"
                                     or at_least(self.b.kernel, (6, 0))):  # new in 6.0
                feats.append((flag,))
        digest = _hex(r, digest_bytes)
        return length, Verity(version, self.b.disk, self.b.disk, dbs, hbs, blocks, hash_start,
                              alg, digest if r.random() < 0.8 else digest.upper(), salt,
                              tuple(feats))

    def _cache(self) -> tuple[int, Cache]:
        r = self.rng
        block = 64 * r.choice((1, 2, 4))
        feats = []
        mode = r.choice((None, "writeback", "writethrough", "passthrough", "WriteBack"))
        if mode:
            feats.append(mode)
        if r.random() < 0.5:
            feats.append("metadata2")
        if r.random() < 0.3:
            feats.append("no_discard_passdown")
        r.shuffle(feats)
        policy = r.choice(("smq", "mq", "cleaner", "default"))
        pargs: tuple[str, ...] = ()
        if r.random() < 0.5:
            pargs = ("migration_threshold", str(r.randint(0, 100000)))
        meta, cdev = self.helper(), self.helper()
        return self.length(block, 4096), Cache(meta, cdev, self.b.disk, block, tuple(feats),
                                               policy, pargs)

    # tables ---------------------------------------------------------------------------------
    def valid(self, kind: str) -> Case:
        """One loadable table whose first (or only) line is *kind*."""
        r = self.rng
        if kind in _STACKABLE or kind == "snapshot-origin":
            lines = [kind] + [r.choice(_STACKABLE) for _ in range(r.choice((0, 0, 1, 2)))]
            entries, start = [], 0
            for k in lines:
                # with a crypt sector_size in the table every boundary must be 4 KiB aligned
                length = self._length_for(k) if len(lines) == 1 else self.length(8)
                if k == "striped":
                    length = self._length_for(k)
                entries.append(Entry(start, length, self.target(k, length)))
                start += length
            return Case(kind, Table(tuple(entries)))
        if kind == "thin-pool":
            meta, data = self.helper(), self.helper()
            block = 128 * r.choice((1, 2, 4))
            blocks = r.randint(1, self.b.helper_sectors // block)
            # read_only cannot format blank metadata (a near miss below)
            feats = frozenset(r.sample(("skip_block_zeroing", "ignore_discard",
                                        "no_discard_passdown", "error_if_no_space"),
                                       r.randint(0, 4)))
            pool = ThinPool(meta, data, block, r.randint(0, blocks), feats)
            return Case(kind, Table((Entry(0, blocks * block, pool),)))
        if kind == "thin":
            origin = self.b.disk if r.random() < 0.4 else None
            t = Thin(self.b.pool, r.randrange(self.b.thin_ids), origin)
            return Case(kind, Table((Entry(0, self.length(8), t),)))
        if kind in ("snapshot", "snapshot-merge"):
            length, s = self._snapshot(kind == "snapshot-merge")
            return Case(kind, Table((Entry(0, length, s),)))
        if kind == "verity":
            length, v = self._verity()
            return Case(kind, Table((Entry(0, length, v),)), readonly=True)
        if kind == "cache":
            length, c = self._cache()
            return Case(kind, Table((Entry(0, length, c),)))
        if kind == "era":
            meta = self.helper()
            return Case(kind, Table((Entry(0, self.length(8), Era(meta, self.b.disk,
                                                                 8 * r.randint(1, 64))),)))
        raise ValueError(kind)

    def _length_for(self, kind: str) -> int:
        if kind == "striped":
            return 8 * 4 * 128 * self.rng.randint(1, 4) // self.rng.choice((1, 2, 4, 8))
        if kind == "crypt":
            return 8 * self.rng.randint(1, 512)
        return self.length(1)

    # near misses ----------------------------------------------------------------------------
    def invalid_cases(self) -> list[Case]:
        """One case per rule: most break it, some sit just inside it (both must agree)."""
        out: list[Case] = []
        for label, make in self._mutations():
            case = make()
            case.label = label
            out.append(case)
        return out

    def _one(self, target: Target, length: int, readonly: bool = False) -> Case:
        return Case("", Table((Entry(0, length, target),)), readonly)

    def _mutations(self) -> list[tuple[str, Callable[[], Case]]]:
        r, d, b = self.rng, self.b.disk, self.b

        def crypt(**kw: object) -> Callable[[], Case]:
            def make() -> Case:
                fields: dict[str, object] = dict(
                    cipher="aes-xts-plain64", key=CryptKey.from_hex(_hex(r, 64)), iv_offset=0,
                    device=d, offset=0, features=())
                fields.update(kw)
                return self._one(Crypt(**fields), 4096)  # type: ignore[arg-type]
            return make

        def flakey(up: int, down: int, *feats: tuple[str, ...]) -> Callable[[], Case]:
            return lambda: self._one(Flakey(d, 0, up, down, tuple(feats)), 2048)

        def snap(store: str, chunk: int, feats: tuple[tuple[str, ...], ...] = (),
                 same: bool = False, merge: bool = False) -> Callable[[], Case]:
            def make() -> Case:
                cow = self.helper()
                cls = SnapshotMerge if merge else Snapshot
                origin = self.helper() if merge else d
                return self._one(cls(origin, origin if same else cow, store, chunk, feats), 64)
            return make

        def verity(length: int = 8, **kw: object) -> Callable[[], Case]:
            def make() -> Case:
                fields: dict[str, object] = dict(
                    version=1, data_dev=d, hash_dev=d, data_block_size=4096,
                    hash_block_size=4096, num_data_blocks=16, hash_start_block=1024,
                    algorithm="sha256", digest=_hex(r, 32), salt=_hex(r, 8), features=())
                fields.update(kw)
                return self._one(Verity(**fields), length, True)  # type: ignore[arg-type]
            return make

        def cache(block: int = 64, feats: tuple[str, ...] = (), policy: str = "smq",
                  pargs: tuple[str, ...] = ()) -> Callable[[], Case]:
            def make() -> Case:
                return self._one(Cache(self.helper(), self.helper(), d, block, feats, policy,
                                       pargs), 1024)
            return make

        def era(block: int) -> Callable[[], Case]:
            return lambda: self._one(Era(self.helper(), d, block), 1024)

        def text(t: str, readonly: bool = False) -> Callable[[], Case]:
            def make() -> Case:
                filled = t.replace("DISK", d)
                for h in ("H1", "H2"):
                    if h in filled:
                        filled = filled.replace(h, self.helper())
                return Case("", Table(()), readonly, filled)
            return make

        key32 = _hex(r, 32)
        return [
            ("table: gap", text("0 8 zero \n16 8 zero \n")),
            ("table: zero length", text("0 0 zero \n")),
            ("table: thin-pool not alone", lambda: Case("", Table((
                Entry(0, 128, ThinPool(self.helper(), self.helper(), 128, 0)),
                Entry(128, 8, Zero()))))),
            ("linear: beyond the device end", lambda: self._one(
                Linear(d, b.disk_sectors - 4), 8)),
            ("linear: up to the device end", lambda: self._one(
                Linear(d, b.disk_sectors - 8), 8)),
            ("striped: length not a multiple of chunk", lambda: self._one(
                Striped(16, (Stripe(d, 0), Stripe(d, 4096))), 48)),
            ("striped: chunk 24 (not a power of two)", lambda: self._one(
                Striped(24, (Stripe(d, 0), Stripe(d, 4096))), 96)),
            ("thin-pool: block size 100", lambda: self._one(
                ThinPool(self.helper(), self.helper(), 100, 0), 1000)),
            ("thin-pool: read_only on blank metadata", lambda: self._one(
                ThinPool(self.helper(), self.helper(), 128, 0, frozenset({"read_only"})), 1024)),
            ("thin: dev id 2^24", lambda: self._one(Thin(b.pool, 1 << 24), 8)),
            ("crypt: key of the wrong size", crypt(cipher="aes-xts-plain64",
                                                   key=CryptKey.from_hex(_hex(r, 24)))),
            ("crypt: key not hex", crypt(cipher="aes-cbc-plain64",
                                         key=CryptKey.from_hex("zz" + key32[2:32]))),
            ("crypt: odd hex digit dropped", crypt(cipher="aes-cbc-plain64",
                                                   key=CryptKey.from_hex(key32[:32] + "f"))),
            ("crypt: sector_size 1000", crypt(features=(("sector_size", "1000"),))),
            ("crypt: sector_size 8192", crypt(features=(("sector_size", "8192"),))),
            ("crypt: iv_offset not a multiple of sector_size", crypt(
                iv_offset=3, features=(("sector_size", "4096"),))),
            ("crypt: offset not a multiple of sector_size", crypt(
                offset=4, features=(("sector_size", "4096"),))),
            ("table: boundary inside a crypt sector", lambda: Case("", Table((
                Entry(0, 12, Linear(d, 0)),
                Entry(12, 4096, Crypt("aes-xts-plain64", CryptKey.from_hex(_hex(r, 64)), 0, d,
                                      0, (("sector_size", "4096"),))))))),
            ("crypt: key count 3", crypt(cipher="aes:3-cbc-plain64",
                                         key=CryptKey.from_hex(_hex(r, 48)))),
            ("crypt: key count 2", crypt(cipher="aes:2-cbc-plain64",
                                         key=CryptKey.from_hex(_hex(r, 32)))),
            ("crypt: keyring size 0", crypt(key=CryptKey.keyring(0, "logon", "dm:none"))),
            ("crypt: keyring type bogus", crypt(key=CryptKey.keyring(32, "bogus", "dm:x"))),
            ("crypt: high_priority", crypt(features=(("high_priority",),))),
            ("crypt: integrity_key_size:0", crypt(features=(("integrity_key_size", "0"),))),
            ("crypt: cipher_null with a key", crypt(cipher="cipher_null-ecb",
                                                    key=CryptKey.from_hex(key32[:32]))),
            ("delay: 4 arguments", text("0 8 delay DISK 0 10 DISK \n")),
            ("flakey: up + down zero", flakey(0, 0)),
            ("flakey: drop_writes and error_writes", flakey(
                1, 1, ("drop_writes",), ("error_writes",))),
            ("flakey: drop_writes twice", flakey(1, 1, ("drop_writes",), ("drop_writes",))),
            ("flakey: corrupt writes while dropping them", flakey(
                1, 1, ("drop_writes",), ("corrupt_bio_byte", "1", "w", "0", "0"))),
            ("flakey: corrupt value 256", flakey(
                1, 1, ("corrupt_bio_byte", "1", "r", "256", "0"))),
            ("flakey: corrupt byte 0", flakey(1, 1, ("corrupt_bio_byte", "0", "r", "0", "0"))),
            ("flakey: direction x", flakey(1, 1, ("corrupt_bio_byte", "1", "x", "0", "0"))),
            ("flakey: error_reads", flakey(1, 1, ("error_reads",))),
            ("flakey: corrupt_bio_byte twice", flakey(
                1, 1, ("corrupt_bio_byte", "1", "r", "0", "0"),
                ("corrupt_bio_byte", "2", "r", "1", "0"))),
            ("flakey: random_read_corrupt above 10^9", flakey(
                1, 1, ("random_read_corrupt", "1000000001"))),
            ("flakey: up interval overflow", flakey((1 << 32) - 1, 1)),
            ("snapshot-origin: two arguments", text("0 8 snapshot-origin DISK DISK\n")),
            ("snapshot: chunk 24", snap("P", 24)),
            ("snapshot: chunk 0 on a new COW", snap("P", 0)),
            ("snapshot: transient chunk 0", snap("N", 0)),
            ("snapshot: COW is the origin", snap("P", 8, same=True)),
            ("snapshot: store X", text("0 8 snapshot DISK H1 X 8\n")),
            ("snapshot: store Nx", text("0 8 snapshot DISK H1 Nx 8\n")),
            ("error: three arguments", text("0 8 error DISK 0 1\n")),
            ("thin-pool: a word after the features", text(
                "0 1024 thin-pool H1 H2 128 0 1 skip_block_zeroing extra\n")),
            ("crypt: allow_discards twice", crypt(features=(("allow_discards",),
                                                             ("allow_discards",)))),
            ("snapshot: passdown without zeroes", snap("P", 8, (("discard_passdown_origin",),))),
            ("snapshot-merge: transient store", snap("N", 8, merge=True)),
            ("verity: version 2", verity(version=2)),
            ("verity: data block 8192", verity(data_block_size=8192)),
            ("verity: hash block 256", verity(hash_block_size=256)),
            ("verity: data device too small", verity(length=136)),
            ("verity: length not a multiple of the data block size", verity(length=4)),
            ("verity: digest too short", verity(digest=_hex(r, 31))),
            ("verity: digest not hex", verity(digest="x" * 64)),
            ("verity: odd salt", verity(salt="abc")),
            ("verity: two corruption modes", verity(
                features=(("ignore_corruption",), ("restart_on_corruption",)))),
            ("verity: restart_on_error", verity(features=(("restart_on_error",),))),
            ("verity: unknown hash", verity(algorithm="nosuchhash")),
            ("verity: not read-only", lambda: Case(
                "", verity()().table, readonly=False)),
            ("cache: block size 100", cache(block=100)),
            ("cache: block size 32", cache(block=32)),
            ("cache: two io modes", cache(feats=("writeback", "writethrough"))),
            ("cache: unknown feature", text("0 1024 cache H1 H2 DISK 64 1 fast smq 0\n")),
            ("cache: unknown policy", cache(policy="lru")),
            ("cache: odd policy args", cache(pargs=("migration_threshold",))),
            ("cache: unknown policy key", cache(pargs=("sequential_threshold", "4"))),
            ("cache: mq ignores an old key", cache(policy="mq",
                                                  pargs=("sequential_threshold", "4"))),
            ("era: block size 12", era(12)),
            ("era: block size 0", era(0)),
            ("era: block size 24", era(24)),
            # rules that changed between the four kernels (docs/vm.md, "Kernels")
            ("verity: try_verify_in_tasklet", verity(features=(("try_verify_in_tasklet",),))),
            ("flakey: random writes corrupted while dropping them", flakey(
                1, 1, ("drop_writes",), ("random_write_corrupt", "1000"))),
            ("flakey: random writes corrupted at rate 0 while dropping them", flakey(
                1, 1, ("drop_writes",), ("random_write_corrupt", "0"))),
            ("flakey: reads corrupted while failing them", flakey(
                1, 1, ("error_reads",), ("corrupt_bio_byte", "1", "r", "0", "0"))),
            ("flakey: random_read_corrupt twice", flakey(
                1, 1, ("random_read_corrupt", "5"), ("random_read_corrupt", "6"))),
            ("flakey: random_read_corrupt 0, then again", flakey(
                1, 1, ("random_read_corrupt", "0"), ("random_read_corrupt", "6"))),
        ]
