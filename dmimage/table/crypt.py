"""``crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>]`` (dm-crypt.c).

Key material never leaves through ``repr``, errors or default output (see
:mod:`dmimage.table.cryptkey`).
"""

from __future__ import annotations

import re
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
from dmimage.table.cryptkey import KEY_TYPES, CryptKey
from dmimage.table.errors import TableError
from dmimage.table.features import Feature, FeatureDef, feature_words, ordered, parse_features

#: crypt_status() STATUSTYPE_TABLE order. high_priority and integrity_key_size are new since
#: 6.1 (present in 6.12).
CRYPT_FEATURES = (
    FeatureDef("allow_discards"),
    FeatureDef("same_cpu_crypt"),
    FeatureDef("high_priority", since=(6, 12)),
    FeatureDef("submit_from_crypt_cpus"),
    FeatureDef("no_read_workqueue"),
    FeatureDef("no_write_workqueue"),
    FeatureDef("integrity", colon=True),
    FeatureDef("sector_size", colon=True),
    FeatureDef("iv_large_sectors"),
    FeatureDef("integrity_key_size", colon=True, since=(6, 12)),
)
#: crypt_ctr_optional(): ``{0, 8}`` on 6.1, ``{0, 9}`` on 6.12.
MAX_FEATURE_ARGS_61 = 8
MAX_FEATURE_ARGS = 9
#: Block ciphers whose key sizes we know (bytes per key); others are not size-checked.
CIPHER_KEY_BYTES = {"aes": (16, 24, 32)}
#: Chain modes: xts takes two keys of the cipher's size.
CHAIN_KEY_FACTOR = {"cbc": 1, "ecb": 1, "xts": 2, "ctr": 1}
#: IV modes that use no extra key material.
PLAIN_IV_MODES = {"plain", "plain64", "plain64be", "essiv", "benbi", "null", "eboiv"}
_OLD_SPEC = re.compile(r"([A-Za-z0-9_]+)(?::([0-9]+))?-([A-Za-z0-9_]+)(?:-([A-Za-z0-9_]+)"
                       r"(?::(\S+))?)?\Z")


@dataclass(frozen=True)
class Crypt:
    """A dm-crypt mapping. ``features`` are kept in kernel print order."""

    type_name: ClassVar[str] = "crypt"
    cipher: str
    key: CryptKey
    iv_offset: int
    device: str
    offset: int
    features: tuple[Feature, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", ordered(self.features, CRYPT_FEATURES))

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Crypt:
        t = cls.type_name
        check_count(args, lambda n: n >= 5, "<cipher> <key> <iv_offset> <dev> <offset> "
                    "[<#opt_params> <opt_params>]", target=t, line=line)
        def num(i: int, name: str) -> int:
            # never quote the word: a line with a field missing may have the key here
            if not args[i].isdigit() or not args[i].isascii():
                raise TableError("not a decimal number", line=line, field=name, target=t)
            return parse_number(args[i], target=t, field=name, line=line)

        return cls(args[0], CryptKey.parse(args[1], line=line), num(2, "iv_offset"),
                   device_arg(args[3], target=t, field="device", line=line), num(4, "offset"),
                   parse_features(args[5:], CRYPT_FEATURES, target=t, line=line))

    def feature(self, name: str) -> str | None:
        for f in self.features:
            if f[0] == name:
                return f[1] if len(f) > 1 else ""
        return None

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        base = (f"{self.cipher} {self.key.text(style.show_keys)} {self.iv_offset} "
                f"{self.device} {self.offset}")
        if not self.features:
            return base
        words = feature_words(self.features, CRYPT_FEATURES)
        return f"{base} {len(self.features)} {' '.join(words)}"

    def devices(self) -> list[str]:
        return [self.device]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("device", self.device, self.offset, length)]

    def logical_block_sectors(self) -> int:
        """crypt_io_hints(): the device's logical block size becomes ``sector_size``."""
        ss = self.feature("sector_size")
        if ss is None or not ss.isdigit() or int(ss) not in (512, 1024, 2048, 4096):
            return 1
        return int(ss) // 512

    def kernel_form(self, kernel: KernelVersion | None = None) -> Crypt:
        """What the kernel prints back: hex key without an odd last digit, features deduped,
        ``sector_size:512`` (the default) left out."""
        seen: dict[str, Feature] = {}
        for f in self.features:
            seen[f[0]] = f  # the kernel keeps flags; a repeated name:value keeps the last
        ss = seen.get("sector_size")
        if ss is not None and ss[1].isdigit():
            if int(ss[1]) == 512:
                del seen["sector_size"]
            else:
                seen["sector_size"] = ("sector_size", str(int(ss[1])))
        return Crypt(self.cipher, self.key.canonical(), self.iv_offset, self.device,
                     self.offset, tuple(seen.values()))

    def expected_key_bytes(self) -> tuple[int, ...] | None:
        """Key sizes the cipher spec accepts, when we know the cipher; None otherwise."""
        if self.cipher.startswith("capi:"):
            return None
        if self.cipher.startswith("cipher_null"):
            return (0,)
        m = _OLD_SPEC.match(self.cipher)
        if not m:
            return None
        name, keycount, chain, ivmode = m.group(1), m.group(2), m.group(3), m.group(4)
        if name not in CIPHER_KEY_BYTES or chain not in CHAIN_KEY_FACTOR:
            return None
        if ivmode is not None and ivmode not in PLAIN_IV_MODES:
            return None
        n = int(keycount) if keycount else 1
        return tuple(n * CHAIN_KEY_FACTOR[chain] * b for b in CIPHER_KEY_BYTES[name])

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        """(field, message, warning) for each rule broken (dm-crypt.c crypt_ctr and helpers)."""
        key = self.key
        if key.is_keyring:
            if key.key_size == 0:
                yield ("key", "a keyring key needs a size above 0 (dm-crypt.c: Error decoding "
                       "and setting key)", False)
            if key.key_type not in KEY_TYPES or not key.description:
                yield ("key", f"keyring reference needs :<size>:<type>:<description> with "
                       f"type one of {', '.join(KEY_TYPES)} (dm-crypt.c: Error decoding and "
                       "setting key)", False)
        elif key.is_hex:
            if key.bad_hex():
                yield ("key", "key is not hexadecimal (dm-crypt.c: Error decoding and setting "
                       "key)", False)
            if key.hex_digits % 2:
                yield ("key", "odd number of hex digits: the kernel ignores the last one", True)
            if key.all_zero():
                yield ("key", "key is all zeros: was it copied from `dmsetup table` output, "
                       "which hides keys (use --showkeys)?", True)
        m = _OLD_SPEC.match(self.cipher)
        if not self.cipher.startswith("capi:") and m is None:
            yield ("cipher", "cipher must be cipher[:keycount]-chainmode-ivmode[:ivopts] or "
                   "capi:... (dm-crypt.c: Error allocating crypto tfm)", False)
        elif m is not None and m.group(2) is not None:
            kc = int(m.group(2))
            if kc == 0 or kc & (kc - 1):
                yield ("cipher", f"key count {kc} is not a power of two (dm-crypt.c: Bad "
                       "cipher key count specification)", False)
        expected = self.expected_key_bytes()
        if expected is not None and key.key_size not in expected:
            sizes = "/".join(str(x) for x in expected)
            yield ("key", f"{self.cipher} takes a key of {sizes} bytes, not {key.key_size} "
                   "(dm-crypt.c: Error decoding and setting key)", False)
        limit = MAX_FEATURE_ARGS if at_least(kernel, (6, 12)) else MAX_FEATURE_ARGS_61
        if len(self.features) > limit:
            yield ("features", f"{len(self.features)} optional parameters; the kernel takes "
                   f"at most {limit} (dm-crypt.c: Invalid number of feature args)", False)
        for d in CRYPT_FEATURES:
            if kernel is not None and d.since is not None and not at_least(kernel, d.since) \
                    and self.feature(d.name) is not None:
                yield ("features", f"{d.name} is not known to kernel {kernel[0]}.{kernel[1]} "
                       "(dm-crypt.c: Invalid feature arguments)", False)
        sector_size = 512
        ss = self.feature("sector_size")
        if ss is not None:
            if not ss.isdigit() or not (512 <= int(ss) <= 4096) or int(ss) & (int(ss) - 1):
                yield ("features", f"sector_size:{ss} must be a power of two from 512 to 4096 "
                       "(dm-crypt.c: Invalid feature value for sector_size)", False)
            else:
                sector_size = int(ss)
                if length % (sector_size // 512):
                    yield ("length", f"length {length} is not a multiple of sector_size "
                           f"{sector_size} (dm-crypt.c: Device size is not multiple of "
                           "sector_size feature)", False)
        if self.offset % (sector_size // 512):
            yield ("offset", f"offset {self.offset} is not a multiple of sector_size "
                   f"{sector_size} (dm-table.c: start=... not aligned to h/w logical block "
                   "size)", False)
        if self.iv_offset % (sector_size // 512):
            yield ("iv_offset", f"iv_offset {self.iv_offset} is not a multiple of the sector "
                   f"size ({sector_size // 512} sectors) (dm-crypt.c: Invalid iv_offset sector)",
                   False)
        integ = self.feature("integrity")
        if integ is not None:
            size, _, kind = integ.partition(":")
            if not size.isdigit() or int(size) == 0 or kind.lower() not in ("aead", "none"):
                yield ("features", f"integrity:{integ} must be integrity:<bytes>:aead|none "
                       "(dm-crypt.c: Invalid integrity arguments / Unknown integrity profile)",
                       False)
        iks = self.feature("integrity_key_size")
        if iks is not None and (not iks.isdigit() or int(iks) == 0):
            yield ("features", f"integrity_key_size:{iks} must be a number above 0 (dm-crypt.c:"
                   " Invalid integrity_key_size argument)", False)
