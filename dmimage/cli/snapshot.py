"""`dmimage snapshot ...`: dm-snapshot's persistent exception store (the COW device), offline.

COW is the snapshot's exception store (what LVM's old-style snapshots keep in their `-cow`
device); ORIGIN the device it snapshots. Exit codes: 0 ok, 1 damage or problems found,
2 usage or I/O error. Readers take shared locks, `merge` exclusive ones (O_EXCL on block
devices: a store or origin the kernel has open is refused); see docs/locking.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import atomic_output, write_text
from dmimage.cli._progress import progress_bar
from dmimage.errors import DeviceError, UsageError

if TYPE_CHECKING:
    from dmimage.snapshot.store import ExceptionStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshot", help="check, dump, export and merge dm-snapshot COW stores",
                       description=__doc__)
    ssub = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")
    ssub.required = True

    ck = ssub.add_parser("check", help="check an exception store",
                         description="Exit 0 if the store is clean (or blank: never activated), "
                         "1 if it is damaged or invalidated, 2 on usage or I/O errors. The "
                         "counters match the snapshot's `dmsetup status`.")
    ck.add_argument("cow", metavar="COW")
    ck.add_argument("origin", metavar="ORIGIN", nargs="?",
                    help="also check exceptions against the origin's size")
    ck.add_argument("--json", action="store_true", help="print a JSON report")
    ck.add_argument("-q", "--quiet", action="store_true", help="only set the exit code")
    add_lock_plan(ck, lambda a: [(a.cow, False), (a.origin, False)])
    ck.set_defaults(func=run_check)

    dp = ssub.add_parser("dump", help="print the header and every exception (old -> new chunk)")
    dp.add_argument("cow", metavar="COW")
    dp.add_argument("--json", action="store_true", help="print JSON")
    add_lock_plan(dp, lambda a: [(a.cow, False)])
    dp.set_defaults(func=run_dump)

    ex = ssub.add_parser("export", help="write the snapshot's content (origin plus exceptions)",
                         description="Unchanged all-zero windows stay holes in a regular file.")
    ex.add_argument("cow", metavar="COW")
    ex.add_argument("origin", metavar="ORIGIN")
    ex.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    add_lock_plan(ex, lambda a: [(a.cow, False), (a.origin, False)])
    ex.set_defaults(func=run_export)

    mg = ssub.add_parser("merge", help="merge the snapshot into its origin, offline",
                         description="What the snapshot-merge target does: every exception's "
                         "chunk is copied onto ORIGIN, the origin is flushed, then the store is "
                         "emptied. ORIGIN then holds the snapshot's content. An interrupted "
                         "merge is finished by running it again.")
    mg.add_argument("cow", metavar="COW")
    mg.add_argument("origin", metavar="ORIGIN")
    mg.add_argument("--dry-run", action="store_true",
                    help="say what would be merged; write nothing")
    add_lock_plan(mg, lambda a: [(a.cow, not a.dry_run), (a.origin, not a.dry_run)])
    mg.set_defaults(func=run_merge)


def _open(path: str, write: bool = False) -> int:
    try:
        return os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None


def _summary(store: ExceptionStore) -> dict[str, object]:
    out: dict[str, object] = {"cow": store.name, "state": store.state.value,
                              "total_sectors": store.cow_bytes // 512}
    if store.chunk_sectors:
        out.update(version=store.version, chunk_size=store.chunk_sectors,
                   exceptions_per_area=store.per_area, exceptions=len(store.old),
                   areas=store.areas, allocated_sectors=store.allocated_sectors,
                   metadata_sectors=store.metadata_sectors)
    return out


def _header_lines(info: dict[str, object]) -> list[str]:
    if info["state"] == "blank":
        return [f"{info['cow']}: blank store (no header: never activated; the kernel would "
                "initialise it)"]
    return [f"{info['cow']}: persistent store, {info['state']}, version {info['version']}, "
            f"chunk size {info['chunk_size']} sectors, {info['exceptions_per_area']} exceptions "
            "per area",
            f"{info['exceptions']} exceptions in {info['areas']} areas; "
            f"{info['allocated_sectors']}/{info['total_sectors']} sectors allocated, "
            f"{info['metadata_sectors']} metadata sectors"]


def run_check(args: argparse.Namespace) -> int:
    from dmimage.snapshot.check import store_problems
    from dmimage.snapshot.store import device_bytes, open_store

    fd, store = open_store(args.cow)
    try:
        origin_bytes = None
        if args.origin is not None:
            ofd = _open(args.origin)
            try:
                origin_bytes = device_bytes(ofd, args.origin)
            finally:
                os.close(ofd)
        problems = [str(p) for p in store_problems(store, origin_bytes)]
    finally:
        os.close(fd)
    info = _summary(store)
    if args.json:
        write_text(json.dumps({**info, "problems": problems}, indent=2) + "\n")
    elif not args.quiet:
        lines = _header_lines(info) + [f"problem: {p}" for p in problems]
        lines.append("clean" if not problems else f"{len(problems)} problems")
        write_text("\n".join(lines) + "\n")
    return 1 if problems else 0


def run_dump(args: argparse.Namespace) -> int:
    from dmimage.snapshot.store import open_store

    fd, store = open_store(args.cow)
    os.close(fd)
    info = _summary(store)
    pairs = list(zip(store.old.tolist(), store.new.tolist(), strict=True))
    if args.json:
        write_text(json.dumps({**info, "exceptions": [{"old": o, "new": n} for o, n in pairs]},
                              indent=1) + "\n")
        return 0
    lines = [f"# {line}" for line in _header_lines(info)]
    if pairs:
        lines.append("old_chunk new_chunk")
        lines += [f"{o} {n}" for o, n in pairs]
    write_text("\n".join(lines) + "\n")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from dmimage.snapshot.store import device_bytes, open_store
    from dmimage.snapshot.view import iter_view

    fd, store = open_store(args.cow)
    ofd = -1
    try:
        ofd = _open(args.origin)
        size = device_bytes(ofd, args.origin)
        if args.output == "-":
            out = sys.stdout.buffer
            for _, buf in iter_view(store, fd, ofd, size, args.origin):
                out.write(buf)
            out.flush()
            return 0
        if os.path.exists(args.output) and not os.path.isfile(args.output):
            raise UsageError(f"{args.output}: not a regular file; give a file path")
        with progress_bar("export", size) as advance, atomic_output(args.output) as f:
            for off, buf in iter_view(store, fd, ofd, size, args.origin, advance):
                if buf.count(0) != len(buf):
                    f.seek(off)
                    f.write(buf)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
        if ofd >= 0:
            os.close(ofd)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from dmimage.snapshot.store import device_bytes, read_store
    from dmimage.snapshot.view import merge_into_origin

    fd = _open(args.cow, write=not args.dry_run)
    ofd = -1
    try:
        store = read_store(fd, args.cow)
        ofd = _open(args.origin, write=not args.dry_run)
        size = device_bytes(ofd, args.origin)
        if args.dry_run:
            from dmimage.snapshot.view import ensure_servable

            ensure_servable(store)
            write_text(f"would merge {len(store.old)} chunks of {store.chunk_sectors or 0} sectors "
                       f"into {args.origin} and empty {args.cow}\n")
            return 0
        with progress_bar("merge") as advance:
            n = merge_into_origin(store, fd, ofd, size, args.origin, advance)
        write_text(f"merged {n} chunks into {args.origin}; {args.cow} is now empty\n")
    finally:
        os.close(fd)
        if ofd >= 0:
            os.close(ofd)
    return 0
