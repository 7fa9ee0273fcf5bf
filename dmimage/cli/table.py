"""`dmimage table`: check, normalise and convert device-mapper tables; emit dm-mod.create=."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmimage.table.model import Table


def _read(path: str) -> str:
    from dmimage.errors import DeviceError

    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DeviceError(f"{path}: not UTF-8 text") from None


def _load(path: str, from_json: bool) -> Table:
    from dmimage.table import parse_table
    from dmimage.table.jsonio import table_from_json

    text = _read(path)
    if not from_json:
        return parse_table(text)
    import json

    from dmimage.table import TableError

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableError(f"bad JSON: {exc.msg}", line=exc.lineno) from None
    return table_from_json(obj)


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _size(text: str) -> tuple[str, int]:
    # the device name may itself contain '=' only in odd paths: split on the last one
    dev, sep, value = text.rpartition("=")
    if not sep or not dev or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected DEVICE=SECTORS, got {text!r}")
    return dev, int(value)


def _kernel(text: str) -> tuple[int, int]:
    from dmimage.table import TableError
    from dmimage.table.args import parse_kernel

    try:
        return parse_kernel(text)
    except TableError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "table", help="check, normalise and convert device-mapper tables",
        description="Device-mapper tables as `dmsetup table` prints them (see docs/tables.md).")
    sub = p.add_subparsers(dest="table_command", metavar="ACTION")
    sub.required = True

    c = sub.add_parser("check", help="validate a table against the kernel's rules",
                       description="Exit 0 if the kernel would load the table, 1 if not; "
                                   "each problem is printed as one line.")
    c.add_argument("file", metavar="FILE", help="table file ('-' for standard input)")
    c.add_argument("--from-json", action="store_true", help="FILE is the JSON form")
    c.add_argument("--size", action="append", type=_size, default=[], metavar="DEV=SECTORS",
                   help="size of a device named in the table, to check lengths against")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing, exit code only")
    c.add_argument("--kernel", type=_kernel, default=None, metavar="VERSION",
                   help="apply this kernel's limits where kernels differ (6.1, 6.12); "
                        "default: the newest dmimage knows")
    c.set_defaults(func=run)

    f = sub.add_parser("format", help="print a table in canonical form (or as JSON)",
                       description="Normalise a table to exactly what `dmsetup table` prints.")
    f.add_argument("file", metavar="FILE", help="table file ('-' for standard input)")
    f.add_argument("--from-json", action="store_true", help="FILE is the JSON form")
    f.add_argument("--json", action="store_true", help="print the JSON form")
    f.add_argument("--show-keys", action="store_true",
                   help="print crypt hex keys (by default they print as zeros, as "
                        "`dmsetup table` shows them)")
    f.add_argument("--kernel", type=_kernel, default=None, metavar="VERSION",
                   help="print as this kernel does (6.1, 6.12): its spelling and the "
                        "defaults it fills in")
    f.set_defaults(func=run)

    d = sub.add_parser("dm-mod-create", help="emit the dm-mod.create= boot parameter",
                       description="Build the kernel's dm-mod.create= parameter for devices "
                                   "given as NAME=FILE, in order.")
    d.add_argument("devices", nargs="+", type=_pair, metavar="NAME=FILE")
    d.add_argument("--from-json", action="store_true", help="the FILEs are the JSON form")
    d.add_argument("--uuid", action="append", type=_pair, default=[], metavar="NAME=UUID",
                   help="uuid for device NAME")
    d.add_argument("--minor", action="append", type=_pair, default=[], metavar="NAME=MINOR",
                   help="fixed minor number for device NAME")
    d.add_argument("--ro", action="store_true", help="create every device read-only")
    d.add_argument("--value-only", action="store_true",
                   help="print only the value, without dm-mod.create=\"...\"")
    d.set_defaults(func=run)


def _check(args: argparse.Namespace) -> int:
    from dmimage.table import TableError

    sizes = dict(args.size) if args.size else None
    try:
        problems = _load(args.file, args.from_json).problems(sizes, args.kernel)
    except TableError as exc:
        problems = [exc]
    bad = False
    for p in problems:
        bad = bad or not p.warning
        if not args.quiet:
            tag = "warning: " if p.warning else ""
            print(f"{args.file}: {tag}{p}")
    return 1 if bad else 0


def _format(args: argparse.Namespace) -> int:
    from dmimage.table import format_table, table_to_json
    from dmimage.table.args import Style

    table = _load(args.file, args.from_json)
    style = Style(kernel=args.kernel, show_keys=args.show_keys)
    if args.kernel is not None:
        table = table.kernel_form(args.kernel)
    if args.json:
        import json

        print(json.dumps(table_to_json(table, style), indent=2))
    else:
        sys.stdout.write(format_table(table, style))
    return 0


def _dm_mod_create(args: argparse.Namespace) -> int:
    from dmimage.errors import UsageError
    from dmimage.table import DmDevice, dm_mod_create

    names = [name for name, _ in args.devices]
    uuids, minors = dict(args.uuid), {}
    for name, value in args.minor:
        try:
            minors[name] = int(value)
        except ValueError:
            raise UsageError(f"--minor {name}: {value!r} is not a number") from None
    for name in list(uuids) + list(minors):
        if name not in names:
            raise UsageError(f"--uuid/--minor name {name!r} is not one of the devices")
    devices = [DmDevice(name, _load(path, args.from_json), uuids.get(name, ""),
                        minors.get(name), args.ro) for name, path in args.devices]
    value = dm_mod_create(devices)
    print(value if args.value_only else f'dm-mod.create="{value}"')
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"check": _check, "format": _format, "dm-mod-create": _dm_mod_create}
    return actions[args.table_command](args)
