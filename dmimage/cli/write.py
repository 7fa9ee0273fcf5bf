"""`dmimage write` / `dmimage discard`: change a thin volume's content offline."""

from __future__ import annotations

import argparse
import io
import sys

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._units import parse_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("write", help="write a file's bytes into a thin volume (offline)",
                       description="Provisions and zero-fills new blocks, copies shared blocks "
                       "before changing them, as the kernel does; commits at the end.")
    p.add_argument("metadata", metavar="META")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--dev-id", type=int, required=True)
    p.add_argument("--offset", type=parse_size, default=0, help="byte offset in the volume")
    p.add_argument("-i", "--input", required=True, help="file to write, or - for stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_lock_plan(p, lambda a: [(a.metadata, True), (a.data, True)])
    p.set_defaults(func=run_write)

    d = sub.add_parser("discard", help="unmap the whole blocks of a byte range (offline)")
    d.add_argument("metadata", metavar="META")
    d.add_argument("data", metavar="DATA")
    d.add_argument("--dev-id", type=int, required=True)
    d.add_argument("--offset", type=parse_size, required=True)
    d.add_argument("--length", type=parse_size, required=True)
    add_lock_plan(d, lambda a: [(a.metadata, True), (a.data, True)])
    d.set_defaults(func=run_discard)


CHUNK = 16 << 20


def run_write(args: argparse.Namespace) -> int:
    from dmimage.cli._progress import progress_bar
    from dmimage.errors import DeviceError
    from dmimage.thin.transaction import open_writable

    try:
        src: io.BufferedIOBase = (sys.stdin.buffer if args.input == "-"  # type: ignore[assignment]
                                  else open(args.input, "rb"))  # noqa: SIM115
    except OSError as exc:
        raise DeviceError(f"{args.input}: {exc.strerror}") from None
    total = _regular_size(src)
    with src, open_writable(args.metadata, args.data) as pool, \
            progress_bar("write", total, enabled=not args.quiet) as advance:
        if total is not None:  # a regular file: copied file to file by the kernel
            start = src.tell()
            pool.write_file(args.dev_id, args.offset, src.fileno(), start, total - start,
                            advance)
        else:
            pos = args.offset
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := src.readinto(buf):
                pool.write(args.dev_id, pos, view[:n])
                pos += n
                advance(n)
        pool.commit()
    return 0


def _regular_size(f: io.BufferedIOBase) -> int | None:
    """The size of a regular input file (a pipe's is unknown)."""
    import os
    import stat

    try:
        st = os.fstat(f.fileno())
    except (OSError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def run_discard(args: argparse.Namespace) -> int:
    from dmimage.thin.transaction import open_writable

    with open_writable(args.metadata, args.data) as pool:
        n = pool.discard(args.dev_id, args.offset, args.length)
        pool.commit()
    print(f"unmapped {n} blocks")
    return 0
