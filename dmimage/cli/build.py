"""`dmimage build`: a thin pool and its volumes from a spec (docs/build.md).

    dmimage build SPEC.toml [-o OUTDIR] [-q] [--vm-verify [--kernel K]] [--json]
    dmimage build --vm-verify -o OUTDIR [--kernel K] [--json]    (verify an earlier build)
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build", help="build a thin-pool disk image (or metadata/data files) from a spec",
        description="Builds the pool described by SPEC.toml offline: a GPT disk image with "
        "metadata and data partitions (or two files), one dmsetup table per device, "
        "activate.sh/deactivate.sh and manifest.json in OUTDIR. --vm-verify then activates "
        "it with activate.sh in a QEMU guest and compares every volume and file with the "
        "manifest.")
    p.add_argument("spec", nargs="?", metavar="SPEC.toml")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="output directory (default: out/NAME)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary, no progress bar")
    p.add_argument("--vm-verify", action="store_true",
                   help="verify the build in a guest (needs QEMU; see docs/vm.md)")
    p.add_argument("--kernel", default="deb12", help="guest kernel for --vm-verify and for "
                   "a Docker store with fs = \"xfs\" (deb11, deb12, deb13, deb13-backports "
                   "or a vmlinuz path)")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dmimage.errors import UsageError

    if args.spec is None:
        if not (args.vm_verify and args.output):
            raise UsageError("give SPEC.toml, or --vm-verify -o OUTDIR to verify a build")
        outdir = Path(args.output)
    else:
        from dmimage.image.docker_store import is_docker_spec

        if is_docker_spec(args.spec):
            return _docker(args)
        from dmimage.cli._progress import progress_bar
        from dmimage.image import build, load_spec
        from dmimage.image.spec import human

        spec = load_spec(args.spec)
        outdir = Path(args.output) if args.output else Path("out") / spec.name
        lines: list[str] = []
        with progress_bar(f"build {spec.name}", enabled=not args.quiet) as advance:
            report = build(spec, outdir, progress=advance, log=lines.append,
                           progress_total=advance.set_total)
        if not args.quiet:
            m = report.manifest
            pool = m["pool"]
            where = (m["image"]["file"] if m["layout"] == "gpt"
                     else f"{m['files']['metadata']['file']} + {m['files']['data']['file']}")
            print(f"built {spec.name} in {report.timings['total']:.2f} s: {outdir}/{where}")
            print(f"  pool {pool['name']}: {pool['nr_data_blocks']} data blocks of "
                  f"{human(pool['data_block_bytes'])}, {pool['data_blocks_used']} used; "
                  f"metadata {human(pool['metadata_size'])}, transaction id "
                  f"{pool['transaction_id']}")
            for line in lines:
                print(f"  {line}")
            print(f"  activate: {outdir}/activate.sh; dm-mod.create=: "
                  f"{'see manifest' if m['dm_mod_create'] else 'not possible (thin targets)'}")
    if args.vm_verify:
        from dmimage.image.guest import verify_build_vm

        rep = verify_build_vm(outdir, kernel=args.kernel)
        if args.json:
            print(json.dumps(rep.to_json(), indent=2))
        else:
            for line in rep.lines():
                print(line)
        return 0 if rep.ok else 1
    return 0


def _docker(args: argparse.Namespace) -> int:
    """``layout = "docker-devicemapper"``: OUTDIR becomes a Docker data root."""
    from pathlib import Path

    from dmimage.errors import UsageError
    from dmimage.image.docker_store import build_docker_store, load_docker_spec

    if args.vm_verify:
        raise UsageError("--vm-verify is not available for layout = \"docker-devicemapper\" "
                         "(the VM suite runs dockerd on built stores: docs/docker.md)")
    spec = load_docker_spec(args.spec)
    outdir = Path(args.output) if args.output else Path("out") / spec.name
    lines: list[str] = []
    rep = build_docker_store(spec, outdir, log=lines.append, kernel=args.kernel)
    if not args.quiet:
        m = rep.manifest
        print(f"built {spec.name} in {rep.timings['total']:.2f} s: Docker data root {outdir} "
              f"({len(m['images'])} images, {len(m['devices'])} devices, pool transaction "
              f"id {m['pool_transaction_id']})")
        for line in lines:
            print(f"  {line}")
    return 0
