#!/bin/sh
# One entry point for a fresh Debian 12 machine (run as root, or with sudo available):
#   ./bootstrap.sh example   set everything up, then build and verify the built-in example
#   ./bootstrap.sh test      set everything up, then run the whole test suite (VM tests included)
#   ./bootstrap.sh setup     only set up
# Set-up installs only what is missing: Debian packages, a virtualenv in .venv with dmimage and
# its test tools, thin-provisioning-tools 1.1 and the guest kernels CI uses (Debian 13's 6.12;
# Debian 12's is installed; DMIMAGE_VM_KERNELS=all adds Debian 11's and 13-backports') unpacked
# under ~/.cache/dmimage/debianNN and Debian 12's lvm2 and Docker packages for the guest under
# ~/.cache/dmimage/{lvm2,docker-debs} (never installed).
set -eu
cd "$(dirname "$0")"
here=$(pwd)

PKGS="qemu-system-x86 linux-image-amd64 busybox-static dmsetup thin-provisioning-tools
      libparted-dev pkg-config e2fsprogs cpio xz-utils zstd util-linux python3-venv python3-dev
      gcc libdevmapper-event1.02.1 libaio1 libedit2"

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

setup_system() {
    missing=""
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "bootstrap: installing Debian packages:$missing" >&2
        sudo_ apt-get update -qq
        DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq $missing >/dev/null
    fi
}

setup_python() {
    py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        "$py" -m venv .venv
    fi
    stamp=.venv/.dmimage-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e ".[test,image,lint]"
        touch "$stamp"
    fi
}

setup_oracles() {
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/dmimage/debian13
    if [ ! -x "$cache/thin-provisioning-tools/usr/sbin/thin_check" ]; then
        sh tools/debian-fetch trixie "$cache" thin-provisioning-tools >/dev/null
    fi
}

setup_kernels() {
    # The guest kernels the VM tests run on: CI's two (deb12 installed, deb13 fetched) or those
    # DMIMAGE_VM_KERNELS names (all: deb11, deb12, deb13, deb13-backports). Fetched kernels are
    # .debs unpacked under ~/.cache/dmimage/debianNN, never installed.
    names=$(echo "${DMIMAGE_VM_KERNELS:-deb12,deb13}" | tr ',' '\n' | grep -v / | tr '\n' ' ')
    # shellcheck disable=SC2086
    [ -z "$names" ] || .venv/bin/dmimage vm kernels --fetch $names >/dev/null
}

setup_guest_debs() {
    # Debian 12's lvm2 (test_lvm_guest.py) and docker.io, containerd, runc and xfsprogs
    # (test_docker_store.py) for the guest: downloaded with `apt-get download` and unpacked
    # under ~/.cache/dmimage/{lvm2,docker-debs}, never installed. That needs apt's lists.
    ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || sudo_ apt-get update -qq
    .venv/bin/python -c "from dmimage.guest.lvm2 import lvm2_root; lvm2_root()" >/dev/null
    .venv/bin/python -c "from dmimage.guest.docker import debs_root; debs_root()" >/dev/null
}

# Unit and differential tests, and the VM tests, side by side on both cores. The VM part leaves
# ~10% of the two cores idle (guests waiting; its last groups finishing one per core: measured
# with /proc/stat over a quiet CI run, docs/vm.md) and holds the long chains (module scenarios
# of 30-70 s), so it runs at normal priority and the unit tests, at nice 5 with their output
# in a file printed afterwards, fill what it leaves. VM tests: xdist groups per (file, kernel,
# shared module fixture), heaviest first, each worker with its own guests restored from the
# saved VM state (~/.cache/dmimage/vmstate) in about a second; lvm2/dockerd tests on deb12
# only (vmtests/conftest.py, docs/vm.md). Each part prints its wall time; any failure fails.
# DMIMAGE_TEST_OVERLAP=0 runs the parts one after the other (to time each alone).
run_tests() {
    # Where PYTHONDONTWRITEBYTECODE is set (this project's CI shell sets it), every worker and
    # every dmimage process the tests start would compile, and pytest assertion-rewrite, each
    # module it imports again: both suites keep their bytecode in a cache outside the tree
    # instead (tests/conftest.py does the same for a bare `pytest tests`)
    if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && [ -z "${PYTHONPYCACHEPREFIX:-}" ]; then
        PYTHONPYCACHEPREFIX=${XDG_CACHE_HOME:-$HOME/.cache}/dmimage/pycache
        export PYTHONPYCACHEPREFIX
        unset PYTHONDONTWRITEBYTECODE
    fi
    unit_log=$(mktemp "${TMPDIR:-/tmp}/dmimage-unit.XXXXXX")
    overlap=${DMIMAGE_TEST_OVERLAP:-1}
    t0=$(date +%s)
    unit_rc=0
    if [ "$overlap" = 0 ]; then
        .venv/bin/python -m pytest -q -n 2 tests || unit_rc=$?
        date +%s >"$unit_log.end"
    else
        ( nice -n 5 .venv/bin/python -m pytest -q -n 2 tests >"$unit_log" 2>&1 &
          child=$!
          trap 'kill "$child" 2>/dev/null || :' TERM
          rc=0; wait "$child" || rc=$?
          date +%s >"$unit_log.end"; exit "$rc" ) &
        unit_pid=$!
        # Ctrl-C reaches the VM part only (a background job ignores SIGINT): stop the unit
        # tests too, show what they printed, and leave no temp file behind
        trap 'kill "$unit_pid" 2>/dev/null || :; wait "$unit_pid" || :; cat "$unit_log"
              rm -f "$unit_log" "$unit_log.end"; exit 130' INT
        trap 'kill "$unit_pid" 2>/dev/null || :; wait "$unit_pid" || :; cat "$unit_log"
              rm -f "$unit_log" "$unit_log.end"; exit 143' TERM HUP
    fi
    t_vm0=$(date +%s)
    vm_rc=0
    DMIMAGE_VM_REQUIRED=1 DMIMAGE_VM_KERNELS=${DMIMAGE_VM_KERNELS:-deb12,deb13} \
        .venv/bin/python -m pytest -q -n 2 --dist loadgroup vmtests || vm_rc=$?
    t_vm=$(date +%s)
    if [ "$overlap" != 0 ]; then
        wait "$unit_pid" || unit_rc=$?
        trap - INT TERM HUP
        echo "bootstrap: the unit tests' output (run at nice 5 beside the VM tests):" >&2
        cat "$unit_log"
    fi
    t_unit=$(cat "$unit_log.end")
    echo "bootstrap: unit tests $((t_unit - t0)) s, VM tests $((t_vm - t_vm0)) s" \
         "($( [ "$overlap" = 0 ] && echo "one after the other" || echo "side by side" )," \
         "$(($(date +%s) - t0)) s in all)" >&2
    rm -f "$unit_log" "$unit_log.end"
    [ "$unit_rc" = 0 ] || echo "bootstrap: unit tests failed (exit $unit_rc)" >&2
    [ "$vm_rc" = 0 ] || echo "bootstrap: VM tests failed (exit $vm_rc)" >&2
    [ "$unit_rc" = 0 ] && [ "$vm_rc" = 0 ]
}

setup() { setup_system; setup_python; setup_oracles; setup_kernels; setup_guest_debs; }

case "${1:-}" in
    setup) setup ;;
    example) setup; PATH="$here/.venv/bin:$PATH" exec sh images/run-example.sh ;;
    test)
        setup
        .venv/bin/ruff check dmimage vmtests tests benchmarks
        .venv/bin/mypy
        run_tests
        ;;
    *) echo "usage: ./bootstrap.sh example|test|setup" >&2; exit 2 ;;
esac
