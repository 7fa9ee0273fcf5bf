#!/bin/sh
# Build images/example.toml into out/example/ and prove it under a real kernel:
#   1. dmimage build           (offline: ext4 volumes, layer snapshots, GPT image, manifest)
#   2. dmimage build --vm-verify  (QEMU guest: activate.sh finds the partitions by PARTUUID,
#      every thin's sha256 = manifest, tables round-trip through dmsetup, ext4 volumes mount
#      read-only and every file's sha256 = manifest, deactivate.sh)
#   3. dmimage check on the metadata partition (extracted from the image)
# Called by `./bootstrap.sh example` with the virtualenv's bin on PATH.
set -eu
cd "$(dirname "$0")/.."
out=out/example
kernel=${DMIMAGE_EXAMPLE_KERNEL:-deb12}
now() { python3 -c 'import time; print(f"{time.monotonic():.2f}")'; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

t0=$(now)
dmimage build images/example.toml -o "$out"
t1=$(now)
echo
dmimage build --vm-verify -o "$out" --kernel "$kernel"
t2=$(now)
echo
python3 - "$out" <<'PY'
import json, sys
from dmimage.image.gpt import extract
out = sys.argv[1]
m = json.load(open(f"{out}/manifest.json"))
p = next(p for p in m["partitions"] if p["role"] == "metadata")
extract(f"{out}/{m['image']['file']}", p["start"], p["size"], f"{out}/metadata.partition")
PY
dmimage check "$out/metadata.partition"
echo "dmimage check: metadata partition OK"
rm -f "$out/metadata.partition"
t3=$(now)
echo
echo "example: built in $(secs "$t0" "$t1") s, verified in the guest in $(secs "$t1" "$t2") s" \
     "(boot included), metadata checked in $(secs "$t2" "$t3") s"
echo "example: $out/example.img, activate with $out/activate.sh (see $out/manifest.json)"
