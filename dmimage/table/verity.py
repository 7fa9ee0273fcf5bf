"""``verity`` (dm-verity-target.c): a read-only device checked against a hash tree.

``<version> <dev> <hash_dev> <data_block_size> <hash_block_size> <num_data_blocks>
<hash_start_block> <algorithm> <digest> <salt> [<#opt_params> <opt_params>]``.
The root digest and salt are hex (printed lower case; an empty salt is ``-``).
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from dmimage.table.args import (
    DEFAULT_STYLE,
    KernelVersion,
    Style,
    at_least,
    check_count,
    device_arg,
    parse_number,
)
from dmimage.table.features import (
    Feature,
    FeatureDef,
    feature_words,
    names,
    ordered,
    parse_features,
)

#: verity_status() order: the corruption mode, the error mode, then the flags, FEC, signature.
VERITY_FEATURES = (
    FeatureDef("ignore_corruption"),
    FeatureDef("restart_on_corruption"),
    FeatureDef("panic_on_corruption"),
    FeatureDef("restart_on_error", since=(6, 12)),
    FeatureDef("panic_on_error", since=(6, 12)),
    FeatureDef("ignore_zero_blocks"),
    FeatureDef("check_at_most_once"),
    FeatureDef("try_verify_in_tasklet", since=(6, 0)),
    FeatureDef("use_fec_from_device", ("fec_dev",), numeric=(False,)),
    FeatureDef("fec_blocks", ("num",)),
    FeatureDef("fec_start", ("offset",)),
    FeatureDef("fec_roots", ("num",)),
    FeatureDef("root_hash_sig_key_desc", ("key_description",), numeric=(False,)),
)
_MODES = ("ignore_corruption", "restart_on_corruption", "panic_on_corruption")
_ERROR_MODES = ("restart_on_error", "panic_on_error")
_FEC = ("use_fec_from_device", "fec_blocks", "fec_start", "fec_roots")
#: DM_VERITY_OPTS_MAX = 5 + 8 (FEC) + 2 (signature) on 6.12; 6.1 has 4 + 8 + 2 (6.0 added
#: try_verify_in_tasklet); 5.10 has 3 + 8 + 2.
MAX_OPT_ARGS, MAX_OPT_ARGS_61, MAX_OPT_ARGS_510 = 15, 14, 13
#: "dm verity: allow only one error handling mode" (5.13): older kernels take several
#: corruption modes and keep the last (Debian 11's 5.10.223 does not have the change).
ONE_MODE_SINCE: KernelVersion = (5, 13)
#: Digest sizes (bytes) of the hashes we know; others are not length-checked.
DIGEST_BYTES = {"sha1": 20, "sha256": 32, "sha512": 64, "sha384": 48, "sha224": 28,
                "md5": 16, "crc32c": 4}
PAGE_SIZE = 4096
_HEX = set(string.hexdigits)


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


@dataclass(frozen=True)
class Verity:
    """A verity mapping; ``features`` in kernel print order."""

    type_name: ClassVar[str] = "verity"
    version: int
    data_dev: str
    hash_dev: str
    data_block_size: int
    hash_block_size: int
    num_data_blocks: int
    hash_start_block: int
    algorithm: str
    digest: str
    salt: str
    features: tuple[Feature, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", self.digest.lower())
        object.__setattr__(self, "salt", self.salt.lower())
        object.__setattr__(self, "features", ordered(self.features, VERITY_FEATURES))

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Verity:
        t = cls.type_name
        check_count(args, lambda n: n >= 10, "<version> <dev> <hash_dev> <data_block_size> "
                    "<hash_block_size> <num_data_blocks> <hash_start_block> <algorithm> "
                    "<digest> <salt> [<#opt_params> <opt_params>] (dm-verity: Not enough "
                    "arguments)", target=t, line=line)

        def num(i: int, name: str, limit: int = (1 << 64) - 1) -> int:
            return parse_number(args[i], target=t, field=name, line=line, limit=limit)

        return cls(num(0, "version", (1 << 32) - 1),
                   device_arg(args[1], target=t, field="data_dev", line=line),
                   device_arg(args[2], target=t, field="hash_dev", line=line),
                   num(3, "data_block_size", (1 << 32) - 1),
                   num(4, "hash_block_size", (1 << 32) - 1), num(5, "num_data_blocks"),
                   num(6, "hash_start_block"), args[7], args[8], args[9],
                   parse_features(args[10:], VERITY_FEATURES, target=t, line=line))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        salt = self.salt if self.salt not in ("", "-") else "-"
        base = (f"{self.version} {self.data_dev} {self.hash_dev} {self.data_block_size} "
                f"{self.hash_block_size} {self.num_data_blocks} {self.hash_start_block} "
                f"{self.algorithm} {self.digest} {salt}")
        words = feature_words(self.features, VERITY_FEATURES)
        return f"{base} {len(words)} {' '.join(words)}" if words else base

    def devices(self) -> list[str]:
        fec = [f[1] for f in self.features if f[0] == "use_fec_from_device"]
        return [self.data_dev, self.hash_dev, *fec]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("data_dev", self.data_dev, 0, length)]

    def logical_block_sectors(self) -> int:
        """verity_io_hints(): the logical block size becomes the data block size."""
        dbs = self.data_block_size
        return dbs // 512 if 512 <= dbs <= PAGE_SIZE and not dbs & (dbs - 1) else 1

    def kernel_form(self, kernel: KernelVersion | None = None) -> Verity:
        """Flags once each; an empty salt as ``-``."""
        feats = tuple(dict.fromkeys(self.features))
        return Verity(self.version, self.data_dev, self.hash_dev, self.data_block_size,
                      self.hash_block_size, self.num_data_blocks, self.hash_start_block,
                      self.algorithm, self.digest, self.salt or "-", feats)

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        yield ("type", "verity tables load only read-only (dmsetup create --readonly; "
               "dm-verity: Device must be readonly)", True)
        if self.algorithm not in DIGEST_BYTES:
            yield ("algorithm", f"hash {self.algorithm!r} is not one dmimage knows: the kernel "
                   "refuses it unless its crypto API has it (dm-verity: Cannot initialize hash "
                   "function)", True)
        if self.version > 1:
            yield ("version", f"version {self.version}: 0 or 1 (dm-verity: Invalid version)",
                   False)
        for name, size in (("data_block_size", self.data_block_size),
                           ("hash_block_size", self.hash_block_size)):
            if size < 512 or size > PAGE_SIZE or size & (size - 1):
                which = "data" if name.startswith("data") else "hash"
                yield (name, f"{size}: a power of two from 512 (the logical block size) to "
                       f"{PAGE_SIZE} (dm-verity: Invalid {which} device block size)", False)
        dbs = self.data_block_size
        if dbs >= 512 and not dbs & (dbs - 1) and length > self.num_data_blocks * (dbs // 512):
            yield ("num_data_blocks", f"{self.num_data_blocks} blocks of {dbs} bytes cover "
                   f"{self.num_data_blocks * (dbs // 512)} sectors, less than the length "
                   f"{length} (dm-verity: Data device is too small)", False)
        digest = DIGEST_BYTES.get(self.algorithm)
        if not _is_hex(self.digest) or len(self.digest) % 2 or \
                (digest is not None and len(self.digest) != 2 * digest):
            want = f" ({2 * digest} hex digits for {self.algorithm})" if digest else ""
            yield ("digest", f"root digest must be hex{want} (dm-verity: Invalid root digest)",
                   False)
        if self.salt != "-" and (not _is_hex(self.salt) or len(self.salt) % 2):
            yield ("salt", "salt must be whole bytes of hex, or - (dm-verity: Invalid salt)",
                   False)
        words = len(feature_words(self.features, VERITY_FEATURES))
        limit = MAX_OPT_ARGS if at_least(kernel, (6, 12)) else \
            MAX_OPT_ARGS_61 if at_least(kernel, (6, 0)) else MAX_OPT_ARGS_510
        if words > limit:
            yield ("features", f"{words} optional arguments, at most {limit} (dm-verity: "
                   "Invalid number of feature args)", False)
        have = names(self.features)
        for d in VERITY_FEATURES:
            if kernel is not None and d.since is not None and not at_least(kernel, d.since) \
                    and d.name in have:
                yield ("features", f"{d.name} is not known to kernel {kernel[0]}.{kernel[1]} "
                       "(dm-verity: Unrecognized verity feature request)", False)
        if at_least(kernel, ONE_MODE_SINCE):
            if sum(have.count(m) for m in _MODES) > 1:
                yield ("features", "more than one of " + ", ".join(_MODES) + " (dm-verity: "
                       "Conflicting error handling parameters)", False)
        elif len(set(have) & set(_MODES)) > 1:  # the model keeps print order, not given order
            yield ("features", "several corruption modes: this kernel keeps the last one "
                   "given, and dmimage prints them in the kernel's order; give one", True)
        if sum(have.count(m) for m in _ERROR_MODES) > 1:
            yield ("features", "more than one of " + ", ".join(_ERROR_MODES) + " (dm-verity: "
                   "Conflicting error handling parameters)", False)
        fec = {f[0]: f[1] for f in self.features if f[0] in _FEC}
        if fec:
            if "use_fec_from_device" not in fec:
                yield ("features", "FEC options without use_fec_from_device", True)
            else:
                if self.data_block_size != self.hash_block_size:
                    yield ("features", "FEC needs equal data and hash block sizes (dm-verity-"
                           "fec: Block sizes must match to use FEC)", False)
                if "fec_roots" not in fec:
                    yield ("features", "use_fec_from_device needs fec_roots (dm-verity-fec: "
                           "Missing fec_roots)", False)
                elif not 2 <= int(fec["fec_roots"]) <= 24:
                    yield ("features", f"fec_roots {fec['fec_roots']}: 2..24 (dm-verity-fec: "
                           "Invalid fec_roots)", False)
                if "fec_blocks" not in fec:
                    yield ("features", "use_fec_from_device needs fec_blocks (dm-verity-fec: "
                           "Missing fec_blocks)", False)
