"""Independent oracles: thin-provisioning-tools 0.9 (C++) and 1.1 (Rust) wrappers.

This module is test infrastructure.  It must not import ``dmimage``: the tools are the
reference against which dmimage's reader/writer is judged.

Locating the tools
------------------
* 0.9 (C++): ``$DMIMAGE_TOOLS09_DIR`` or ``/usr/sbin`` (Debian 12's package).
* 1.1 (Rust): ``$DMIMAGE_TOOLS11_DIR`` or
  ``${XDG_CACHE_HOME:-~/.cache}/dmimage/debian13/thin-provisioning-tools/usr/sbin``.
  If missing it is fetched (unless ``DMIMAGE_NO_FETCH=1``) with the first existing of
  ``$DMIMAGE_DEBIAN13_FETCH``, ``<repo>/tools/debian13-fetch``,
  ``/work/shared/tools/debian13-fetch``, run as
  ``sh SCRIPT <cache>/dmimage/debian13 thin-provisioning-tools``.

Every located tool set is version-checked (``thin_check -V``).  A missing tool raises
:class:`OracleUnavailable` with a message saying what was looked for.

Observed ``thin_check`` exit codes (see tests/test_oracles_selftest.py):
* 1.1.0: 0 = clean; 64 on every damage we tried (checksum, blocknr, leak, cycle,
  out-of-range pointer, truncation, ...).  Leaks are repaired by ``--auto-repair``
  (exit 0 afterwards).
* 0.9.0: 0 = clean; 1 on damage.  ``thin_check`` prints the TRANSACTION_ID / METADATA_FREE_BLOCKS
  lines on stdout, progress/error text on stderr.

The half-second exit of the 1.1 tools
-------------------------------------
thin_check 1.1 (and any 1.1 tool with a progress thread) waits for that thread before it exits,
and the thread sleeps 0.5 s at a time (``nanosleep``): a check of a small file takes 0.5 s of
wall time for ~3 ms of work, and the suites run thousands. Every 1.1 run started through this
module (:func:`run`, :func:`check_rcs`, or ``env=tool_env(tools)``) gets ``LD_PRELOAD`` of a
small shim, built once with the C compiler into the cache, that caps each ``nanosleep`` of the
process at 5 ms: the thread then notices the end at once. It changes no verdict and no output
(test_oracles_selftest.py compares both ways on good and damaged pools). Without a compiler,
or with ``DMIMAGE_ORACLE_SLEEP=1``, the tools run unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "OracleUnavailable",
    "ToolError",
    "Tools",
    "TOOL_NAMES",
    "THIN_CHECK_FAIL_RC",
    "tools_09",
    "tools_11",
    "find_tools",
    "fetch_script",
    "run",
    "restore",
    "restore_file",
    "check",
    "dump",
    "repair",
    "thin_ls",
    "thin_delta",
    "thin_rmap",
    "metadata_size",
    "pack",
    "unpack",
    "nr_meta_blocks_for",
    "make_sparse",
    "tool_env",
    "nosleep_shim",
]

META_BLOCK = 4096
MAX_META_BLOCKS = 4_161_600

TOOL_NAMES = (
    "thin_check",
    "thin_dump",
    "thin_restore",
    "thin_repair",
    "thin_ls",
    "thin_delta",
    "thin_rmap",
    "thin_trim",
    "thin_metadata_size",
    "thin_metadata_pack",
    "thin_metadata_unpack",
)

#: exit status of ``thin_check`` on damaged metadata, per version (observed).
THIN_CHECK_FAIL_RC = {"0.9": 1, "1.1": 64}

REPO = Path(__file__).resolve().parents[1]


class OracleUnavailable(RuntimeError):
    """The requested thin-provisioning-tools binary cannot be found or fetched."""


class ToolError(RuntimeError):
    """A tool exited non-zero where success was required."""

    def __init__(self, argv, rc, stdout, stderr):
        self.argv, self.rc, self.stdout, self.stderr = list(map(str, argv)), rc, stdout, stderr
        super().__init__(
            f"{' '.join(self.argv)} exited {rc}\n--- stderr ---\n{stderr[-4000:]}"
            f"\n--- stdout ---\n{stdout[-2000:]}"
        )


@dataclass(frozen=True)
class Tools:
    """Paths of one thin-provisioning-tools installation."""

    series: str  # "0.9" or "1.1"
    version: str  # full version printed by ``thin_check -V``
    bindir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Path:
        # tools.thin_check etc.
        if name in TOOL_NAMES:
            return self.path(name)
        raise AttributeError(name)

    def has(self, name: str) -> bool:
        return name in self.paths

    def path(self, name: str) -> Path:
        try:
            return self.paths[name]
        except KeyError:
            raise OracleUnavailable(
                f"{name} is not part of thin-provisioning-tools {self.version} in {self.bindir}"
            ) from None

    @property
    def fail_rc(self) -> int:
        return THIN_CHECK_FAIL_RC[self.series]

    def __repr__(self) -> str:
        return f"Tools({self.series}: {self.version} @ {self.bindir})"


def _version_of(thin_check: Path) -> str:
    try:
        p = subprocess.run([str(thin_check), "-V"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise OracleUnavailable(f"cannot run {thin_check}: {e}") from e
    return (p.stdout.strip() or p.stderr.strip()).split()[-1] if (p.stdout or p.stderr) else ""


def find_tools(bindir: Path | str, series: str) -> Tools:
    """Collect the thin_* tools in *bindir* and verify their version starts with *series*."""
    bindir = Path(bindir)
    paths = {}
    for name in TOOL_NAMES:
        p = bindir / name
        if p.exists() and os.access(p, os.X_OK):
            paths[name] = p
    if "thin_check" not in paths:
        raise OracleUnavailable(f"thin-provisioning-tools {series}: no thin_check in {bindir}")
    version = _version_of(paths["thin_check"])
    if not version.startswith(series + "."):
        raise OracleUnavailable(
            f"thin-provisioning-tools in {bindir} is version {version!r}, expected {series}.x"
        )
    return Tools(series=series, version=version, bindir=bindir, paths=paths)


_cache: dict[str, Tools] = {}


def tools_09() -> Tools:
    """The C++ 0.9 tools (``$DMIMAGE_TOOLS09_DIR`` or /usr/sbin)."""
    if "0.9" not in _cache:
        d = os.environ.get("DMIMAGE_TOOLS09_DIR", "/usr/sbin")
        try:
            _cache["0.9"] = find_tools(d, "0.9")
        except OracleUnavailable as e:
            raise OracleUnavailable(
                f"{e}\nInstall Debian 12's thin-provisioning-tools (0.9.0) "
                "or set DMIMAGE_TOOLS09_DIR."
            ) from None
    return _cache["0.9"]


def _cache_home() -> Path:
    x = os.environ.get("XDG_CACHE_HOME")
    return Path(x) if x else Path.home() / ".cache"


def fetch_script() -> Path | None:
    """The debian13-fetch script: $DMIMAGE_DEBIAN13_FETCH, <repo>/tools/, /work/shared/tools/."""
    cands = []
    if os.environ.get("DMIMAGE_DEBIAN13_FETCH"):
        cands.append(Path(os.environ["DMIMAGE_DEBIAN13_FETCH"]))
    cands += [REPO / "tools" / "debian13-fetch", Path("/work/shared/tools/debian13-fetch")]
    for c in cands:
        if c.is_file():
            return c
    return None


def tools_11(fetch: bool = True) -> Tools:
    """The Rust 1.1 tools from Debian 13's package, fetched into the cache if needed."""
    if "1.1" in _cache:
        return _cache["1.1"]
    if os.environ.get("DMIMAGE_TOOLS11_DIR"):
        _cache["1.1"] = find_tools(os.environ["DMIMAGE_TOOLS11_DIR"], "1.1")
        return _cache["1.1"]
    dest = _cache_home() / "dmimage" / "debian13"
    bindir = dest / "thin-provisioning-tools" / "usr" / "sbin"
    if not (bindir / "thin_check").exists():
        if not fetch or os.environ.get("DMIMAGE_NO_FETCH") == "1":
            raise OracleUnavailable(
                f"thin-provisioning-tools 1.1 not found in {bindir} (fetch disabled)"
            )
        script = fetch_script()
        if script is None:
            raise OracleUnavailable(
                f"thin-provisioning-tools 1.1 not found in {bindir} and no debian13-fetch script "
                "(set DMIMAGE_DEBIAN13_FETCH or DMIMAGE_TOOLS11_DIR)"
            )
        p = subprocess.run(
            ["sh", str(script), str(dest), "thin-provisioning-tools"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if p.returncode != 0 or not (bindir / "thin_check").exists():
            raise OracleUnavailable(
                f"fetching thin-provisioning-tools 1.1 with {script} failed (rc {p.returncode}):\n"
                f"{p.stderr[-2000:]}"
            )
    _cache["1.1"] = find_tools(bindir, "1.1")
    return _cache["1.1"]


# ----------------------------------------------------------------------------- running

_NOSLEEP_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>
/* dmimage tests/oracles.py: cap every nanosleep at 5 ms (see the module's docstring). */
int nanosleep(const struct timespec *req, struct timespec *rem) {
    static int (*real)(const struct timespec *, struct timespec *);
    struct timespec t = *req;
    if (!real)
        real = (int (*)(const struct timespec *, struct timespec *))dlsym(RTLD_NEXT, "nanosleep");
    if (t.tv_sec > 0 || t.tv_nsec > 5000000) {
        t.tv_sec = 0;
        t.tv_nsec = 5000000;
    }
    return real(&t, rem);
}
"""

_shim: list[str | None] = []


def nosleep_shim() -> str | None:
    """The path of the nanosleep-capping shim (built on first use into the cache; several
    processes may build it at once: each renames its own build into place), or None when
    it is disabled or cannot be built."""
    if _shim:
        return _shim[0]
    path: str | None = None
    if os.environ.get("DMIMAGE_ORACLE_SLEEP") != "1":
        path = build_shared_object("nosleep", _NOSLEEP_C, shim_cache(), libs=("-ldl",))
    _shim.append(path)
    return path


def shim_cache() -> Path:
    """Where the oracle shims are built (the user's cache)."""
    return _cache_home() / "dmimage" / "oracle-shim"


def build_shared_object(name: str, source: str, cache: Path,
                        libs: tuple[str, ...] = ()) -> str | None:
    """``source`` (C) built into ``cache``/NAME-TAG.so on first use, TAG from the source;
    several processes may build it at once: each renames its own build into place. None
    without a compiler (the callers then run the tools plainly)."""
    tag = hashlib.sha256(source.encode()).hexdigest()[:12]
    out = cache / f"{name}-{tag}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
            p = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-x", "c", "-o", str(tmp),
                                "-", *libs], input=source, capture_output=True, text=True,
                               timeout=120)
            if p.returncode == 0:
                os.replace(tmp, out)
            else:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return str(out) if out.exists() else None


def tool_env(tools: Tools) -> dict[str, str] | None:
    """The environment to run one of ``tools`` in: the 1.1 tools with the shim preloaded
    (module docstring), anything else as it is (None)."""
    shim = nosleep_shim() if tools.series == "1.1" else None
    if shim is None:
        return None
    pre = os.environ.get("LD_PRELOAD")
    return dict(os.environ, LD_PRELOAD=f"{shim} {pre}" if pre else shim)



def run(
    tools: Tools,
    name: str,
    *args,
    check: bool = False,
    timeout: float = 600,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``tools.<name> args...``; text output captured.  ``check=True`` raises ToolError."""
    argv = [str(tools.path(name)), *map(str, args)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                       env=tool_env(tools))
    if check and p.returncode != 0:
        raise ToolError(argv, p.returncode, p.stdout, p.stderr)
    return p


def make_sparse(path: Path | str, nr_blocks: int) -> Path:
    """Create/resize *path* as a sparse file of nr_blocks × 4 KiB (contents zeroed)."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(nr_blocks * META_BLOCK)
    return path


def nr_meta_blocks_for(nr_mappings: int, nr_devices: int = 1, nr_data_blocks: int = 0) -> int:
    """A comfortable metadata size (4 KiB blocks) for thin_restore of an expanded XML pool.

    Worst case leaves are 1/3 full (84 of 252) under 0.9's 50/50 splits they are ~1/2 full;
    we assume 1/3 to be safe, plus internal levels, one empty bottom root per device, the
    details and top-level trees, data bitmaps + index, metadata bitmaps and slack.
    """
    leaves = -(-nr_mappings // 84)
    internal = -(-leaves // 84) * 2
    data_bitmaps = -(-nr_data_blocks // 16320) if nr_data_blocks else 0
    n = 64 + leaves + internal + 2 * nr_devices + 2 * data_bitmaps
    n += -(-n // 16320) + 16
    n = max(n, 1024)  # 4 MiB minimum: cheap (sparse) and what people use for tests
    return min(n, MAX_META_BLOCKS)


def restore_file(
    xml_path: Path | str,
    meta_path: Path | str,
    tools: Tools,
    nr_meta_blocks: int | None = None,
    *extra,
) -> Path:
    """thin_restore from an XML file.  If nr_meta_blocks is given (or *meta_path* does not
    exist) the output is (re)created as a sparse file of that size (default 1024 blocks)."""
    meta_path = Path(meta_path)
    if nr_meta_blocks is not None or not meta_path.exists():
        make_sparse(meta_path, nr_meta_blocks or 1024)
    run(tools, "thin_restore", "-q", "-i", xml_path, "-o", meta_path, *extra, check=True)
    return meta_path


def restore(
    xml_text: str, meta_path: Path | str, tools: Tools, nr_meta_blocks: int | None = None, *extra
) -> Path:
    """thin_restore *xml_text* into *meta_path* (sparse, nr_meta_blocks × 4 KiB)."""
    meta_path = Path(meta_path)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", dir=meta_path.parent, delete=False) as f:
        f.write(xml_text)
        xml_path = f.name
    try:
        return restore_file(xml_path, meta_path, tools, nr_meta_blocks, *extra)
    finally:
        os.unlink(xml_path)


def check(meta_path: Path | str, tools: Tools, *args, timeout: float = 300) -> tuple[int, str, str]:
    """thin_check; returns (returncode, stdout, stderr).  Never raises for a failed check
    (a timeout raises subprocess.TimeoutExpired)."""
    p = run(tools, "thin_check", *args, meta_path, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def check_rcs(meta_paths: list[Path] | list[str], tools: Tools, *args,
              timeout: float = 300) -> list[int]:
    """thin_check's exit status for each file, the runs side by side."""
    env = tool_env(tools)
    procs = [subprocess.Popen([str(tools.path("thin_check")), *map(str, args), str(p)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
             for p in meta_paths]
    return [p.wait(timeout=timeout) for p in procs]


def dump(meta_path: Path | str, tools: Tools, *args) -> str:
    """thin_dump to a string (raises ToolError on failure).  1.1 omits the final newline."""
    return run(tools, "thin_dump", *args, meta_path, check=True).stdout


def repair(
    in_path: Path | str,
    out_path: Path | str,
    tools: Tools,
    nr_meta_blocks: int | None = None,
    *args,
) -> subprocess.CompletedProcess:
    """thin_repair -i in -o out (out created sparse with in's size unless given)."""
    out_path = Path(out_path)
    if nr_meta_blocks is None:
        nr_meta_blocks = max(1, os.path.getsize(in_path) // META_BLOCK)
    make_sparse(out_path, nr_meta_blocks)
    return run(tools, "thin_repair", "-i", in_path, "-o", out_path, *args)


def thin_ls(meta_path: Path | str, tools: Tools, *args) -> str:
    return run(tools, "thin_ls", *args, meta_path, check=True).stdout


def thin_delta(meta_path: Path | str, tools: Tools, *args) -> str:
    return run(tools, "thin_delta", *args, meta_path, check=True).stdout


def thin_rmap(meta_path: Path | str, tools: Tools, *args) -> str:
    return run(tools, "thin_rmap", *args, meta_path, check=True).stdout


def metadata_size(tools: Tools, *args) -> str:
    """thin_metadata_size output (1.1: '1066032 sectors'; 0.9: a sentence)."""
    return run(tools, "thin_metadata_size", *args, check=True).stdout


def pack(meta_path: Path | str, out: Path | str, tools: Tools) -> Path:
    """thin_metadata_pack (1.1 only)."""
    run(tools, "thin_metadata_pack", "-i", meta_path, "-o", out, check=True)
    return Path(out)


def unpack(packed: Path | str, out: Path | str, tools: Tools) -> Path:
    """thin_metadata_unpack (1.1 only)."""
    run(tools, "thin_metadata_unpack", "-i", packed, "-o", out, check=True)
    return Path(out)


def which_all() -> dict[str, str]:
    """Debug helper: where each series was found (or why not)."""
    out = {}
    for series, fn in (("0.9", tools_09), ("1.1", lambda: tools_11(fetch=False))):
        try:
            out[series] = repr(fn())
        except OracleUnavailable as e:
            out[series] = f"unavailable: {e}"
    return out


if __name__ == "__main__":  # pragma: no cover
    for k, v in which_all().items():
        print(k, v)
