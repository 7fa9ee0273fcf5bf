"""A dm-crypt key: hex key material, a kernel keyring reference, or none (``-``).

Hex key material is secret: ``repr()`` and ``str()`` never show it, errors never quote it,
and tables print it as zeros (as ``dmsetup table`` does) unless the caller asks for keys
(:class:`~dmimage.table.args.Style` ``show_keys``). A keyring reference
(``:<size>:<type>:<description>``) names a key and is printed as is.
"""

from __future__ import annotations

import string

from dmimage.table.errors import TableError

_HEX = set(string.hexdigits)
#: dm-crypt.c crypt_set_keyring_key(): the key types it looks up (encrypted and trusted only
#: when the kernel is built with them; Debian's kernels are).
KEY_TYPES = ("logon", "user", "encrypted", "trusted")


class CryptKey:
    """Immutable; compares by value. Build with :meth:`parse` or the ``hex``/``keyring``
    class methods."""

    __slots__ = ("_hex", "key_size", "key_type", "description")

    def __init__(self, *, hex_text: str | None = None, key_size: int = 0,
                 key_type: str | None = None, description: str | None = None) -> None:
        self._hex = hex_text
        self.key_size = key_size
        self.key_type = key_type
        self.description = description

    # construction ---------------------------------------------------------------------------
    @classmethod
    def none(cls) -> CryptKey:
        """``-``: no key (cipher_null)."""
        return cls()

    @classmethod
    def from_hex(cls, text: str) -> CryptKey:
        """Hex key material as written; the kernel reads ``len // 2`` bytes (an odd last digit
        is ignored) and prints lower case."""
        return cls(hex_text=text.lower(), key_size=len(text) // 2)

    @classmethod
    def keyring(cls, key_size: int, key_type: str, description: str) -> CryptKey:
        return cls(key_size=key_size, key_type=key_type, description=description)

    @classmethod
    def parse(cls, word: str, *, line: int | None = None) -> CryptKey:
        """One table word: ``-``, hex digits, or ``:<size>:<type>:<description>``."""
        if word == "-":
            return cls.none()
        if word.startswith(":"):
            size_text, sep, rest = word[1:].partition(":")
            if not sep or not size_text.isdigit():
                raise TableError("keyring reference must be :<key_size>:<key_type>:"
                                 "<key_description> (dm-crypt.c: Cannot parse key size)",
                                 line=line, field="key", target="crypt")
            key_type, sep, desc = rest.partition(":")
            return cls.keyring(int(size_text), key_type if sep else rest, desc if sep else "")
        return cls.from_hex(word)

    # properties -----------------------------------------------------------------------------
    @property
    def is_hex(self) -> bool:
        return self._hex is not None

    @property
    def is_keyring(self) -> bool:
        return self.key_type is not None

    @property
    def hex_digits(self) -> int:
        return len(self._hex) if self._hex is not None else 0

    def bad_hex(self) -> bool:
        """Not hex digits where the kernel decodes (hex2bin fails: the table is refused)."""
        h = self._hex or ""
        return any(c not in _HEX for c in h[:2 * (len(h) // 2)])

    def all_zero(self) -> bool:
        """A hex key of zeros: most likely copied from redacted ``dmsetup table`` output."""
        return self._hex is not None and self._hex != "" and set(self._hex) <= {"0"}

    def canonical(self) -> CryptKey:
        """As the kernel prints it back: an odd last hex digit dropped."""
        if self._hex is None or len(self._hex) % 2 == 0:
            return self
        return CryptKey(hex_text=self._hex[:-1], key_size=self.key_size)

    # output ---------------------------------------------------------------------------------
    def text(self, show: bool) -> str:
        """The table word; hex material as zeros unless *show*."""
        if self.key_type is not None:
            return f":{self.key_size}:{self.key_type}:{self.description}"
        if self._hex is None:
            return "-" if show else "0"  # dmsetup zeroes whatever word is not a keyring ref
        return self._hex if show else "0" * len(self._hex)

    def secret_hex(self) -> str | None:
        """The hex material itself (for callers that must hand it on, e.g. JSON with keys)."""
        return self._hex

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CryptKey):
            return NotImplemented
        return (self._hex, self.key_size, self.key_type, self.description) == \
            (other._hex, other.key_size, other.key_type, other.description)

    def __hash__(self) -> int:
        return hash((self._hex, self.key_size, self.key_type, self.description))

    def __repr__(self) -> str:
        if self.key_type is not None:
            return f"CryptKey(:{self.key_size}:{self.key_type}:{self.description})"
        if self._hex is None:
            return "CryptKey(-)"
        return f"CryptKey(<{self.hex_digits} hex digits redacted>)"

    __str__ = __repr__
