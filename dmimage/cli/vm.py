"""`dmimage vm`: run things in a throw-away QEMU guest with a real device-mapper kernel.

    dmimage vm run [--kernel K] [--disk PATH[:ro]]... -- CMD...
    dmimage vm verify META DATA [--dev N[:SIZE]]... [--kernel K] [--json]
    dmimage vm kernels [NAME...] [--fetch]

The guest is dmimage.guest's appliance (busybox, dmsetup, dm-thin-pool); see docs/vm.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from dmimage.cli._locking import add_lock_plan


def _parse_disk(spec: str) -> tuple[str, bool]:
    path, sep, mode = spec.rpartition(":")
    if sep and mode in ("ro", "rw"):
        return path, mode == "ro"
    return spec, False


def cmd_run(args: argparse.Namespace) -> int:
    from dmimage.errors import UsageError
    from dmimage.guest.kernels import kernel_by_name
    from dmimage.guest.machine import Machine

    command = list(args.guest_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no guest command given (dmimage vm run [...] -- CMD)")
    kernel = kernel_by_name(args.kernel)
    disks = [_parse_disk(s) for s in args.disk]
    with Machine(kernel, memory_mb=args.memory) as vm:
        if args.verbose:
            print(f"dmimage vm: {kernel} ready in {vm.boot_time:.2f} s ({vm.start_kind}, "
                  f"{vm.accel})", file=sys.stderr)
        exports = []
        for i, (path, ro) in enumerate(disks):
            d = vm.attach(path, read_only=ro)
            exports.append(f"DISK{i}={shlex.quote(d.guest_path)}")
            if args.verbose:
                print(f"dmimage vm: {path} -> {d.guest_path} ({'ro' if ro else 'rw'})",
                      file=sys.stderr)
        script = " ".join(command)
        if exports:
            script = "export " + " ".join(exports) + "\n" + script
        res = vm.run(script, timeout=args.timeout)
        sys.stdout.buffer.write(res.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(res.stderr)
        sys.stderr.flush()
        if res.timed_out:
            print(f"dmimage vm: guest command timed out after {args.timeout} s",
                  file=sys.stderr)
        if args.dmesg:
            sys.stderr.write(vm.dmesg())
        if args.check_dmesg:
            vm.check_dmesg(since_last=False)
        for d in vm.disks:
            vm.detach(d)
        return res.returncode


def _parse_dev(spec: str) -> tuple[int, int | None]:
    from dmimage.cli._units import parse_size

    dev, sep, size = spec.partition(":")
    try:
        return int(dev, 0), (parse_size(size) if sep else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --dev {spec!r} (want N or N:SIZE)") from None


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from dmimage.guest.kernels import kernel_by_name
    from dmimage.guest.machine import Machine
    from dmimage.vm.verify import verify_in

    devs = dict(args.dev) if args.dev else None
    kernel = kernel_by_name(args.kernel, fetch=True)
    with Machine(kernel, memory_mb=args.memory) as vm:
        report = verify_in(vm, args.metadata, args.data, devs, timeout=args.timeout)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(f"kernel {report.kernel}: {report.pool_status}")
        for d in report.devices:
            verdict = "ok" if d.ok else f"DIFFERS{': ' + d.error if d.error else ''}"
            print(f"thin {d.dev_id}\t{d.size}\tdmimage {d.offline_sha256}\t"
                  f"kernel {d.guest_sha256 or '-'}\t{verdict}")
        for e in report.errors:
            print(f"error: {e}", file=sys.stderr)
        print("all thins agree" if report.ok else "MISMATCH", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_kernels(args: argparse.Namespace) -> int:
    from dmimage.errors import UsageError
    from dmimage.guest.kernels import KNOWN, KernelNotFound, list_kernels, selected_names

    try:
        names = selected_names(",".join(args.names)) if args.names else list(KNOWN)
        rows = list_kernels(names, fetch=args.fetch)
    except KernelNotFound as exc:
        raise UsageError(str(exc)) from exc
    print("NAME\tVERSION\tSTATE\tPATH")
    for row in rows:
        version = row.kernel.version if row.kernel is not None else "-"
        print(f"{row.name}\t{version}\t{row.state}\t{row.where}")
        if row.error:
            print(f"dmimage vm kernels: {row.name}: {row.error}", file=sys.stderr)
    return 1 if any(row.state == "failed" for row in rows) else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("vm", help="run commands in a QEMU guest with a real dm kernel",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="vm_command", metavar="VMCOMMAND")
    sub.required = True

    r = sub.add_parser("run", help="boot, attach disks, run a shell command, print its output, "
                                   "exit with its status")
    r.add_argument("--kernel", default="deb12",
                   help="guest kernel: deb12 (installed), deb11, deb13 or deb13-backports "
                        "(fetched on demand), or a vmlinuz path (default: deb12)")
    r.add_argument("--disk", action="append", default=[], metavar="PATH[:ro]",
                   help="attach a file as a virtio disk (read-write unless :ro); the guest "
                        "command sees its device as $DISK0, $DISK1, ... (repeatable)")
    r.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before the guest command is killed (default 300)")
    r.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    r.add_argument("--dmesg", action="store_true", help="print the guest kernel log afterwards")
    r.add_argument("--check-dmesg", action="store_true",
                   help="fail (exit 2) if the guest kernel logged a BUG/WARNING/Call Trace")
    r.add_argument("-v", "--verbose", action="store_true", help="report boot time and disks")
    r.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="CMD",
                   help="-- CMD...: run with sh in the guest")
    # A guest writes to its read-write disks: no other dmimage may edit them meanwhile.
    add_lock_plan(r, lambda a: [(path, not ro) for path, ro in map(_parse_disk, a.disk)])
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", help="activate a pool read-only in the guest and compare every "
                                      "thin's content with dmimage's offline export",
                       description="Exit 0 only if the kernel reads each thin exactly as "
                       "`dmimage export` does (sha256 compared; nothing is written).")
    v.add_argument("metadata", metavar="META")
    v.add_argument("data", metavar="DATA")
    v.add_argument("--dev", action="append", type=_parse_dev, default=[], metavar="N[:SIZE]",
                   help="thin to compare, optionally with a size in bytes (suffixes K, M, G, "
                        "s); default size: end of the highest mapped block; default: all thins")
    v.add_argument("--kernel", default="deb12",
                   help="guest kernel: deb11, deb12, deb13, deb13-backports or a vmlinuz path "
                        "(default: deb12)")
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed for hashing one thin in the guest (default 600)")
    v.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    add_lock_plan(v, lambda a: [(a.metadata, False), (a.data, False)])
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("kernels", help="list the guest kernels: version, fetched or not, path",
                       description="One line per kernel: NAME, VERSION, STATE (installed, "
                       "fetched, not fetched, failed) and PATH (the vmlinuz, or where a fetched "
                       "kernel is unpacked). Exit 1 if a kernel is missing after --fetch.")
    k.add_argument("names", nargs="*", metavar="NAME",
                   help="kernels to list (default: all: deb11, deb12, deb13, deb13-backports)")
    k.add_argument("--fetch", action="store_true",
                   help="fetch missing kernels (their .debs from Debian, unpacked, never "
                        "installed)")
    k.set_defaults(func=cmd_kernels)
