"""Device-mapper tables: model, text and JSON forms, kernel validation, dm-mod.create=.

The public API (docs/tables.md)::

    parse_table(text) -> Table          format_table(table) -> str
    Table.validate(sizes=None)          dm_mod_create(devices) -> str
    table_to_json(table) / table_from_json(obj)
"""

from __future__ import annotations

from typing import Any

from dmimage.table.errors import TableError
from dmimage.table.model import Entry, Table
from dmimage.table.targets import (
    Error,
    Generic,
    Linear,
    Stripe,
    Striped,
    Target,
    Thin,
    ThinPool,
    Zero,
    split_args,
)
from dmimage.table.text import format_entry, format_table, parse_entry, parse_table, parse_tables

__all__ = [
    "DmDevice", "Entry", "Error", "Generic", "Linear", "Stripe", "Striped", "Table",
    "TableError", "Target", "Thin", "ThinPool", "Zero", "dm_mod_create", "dm_mod_create_param",
    "format_entry", "format_table", "parse_dm_mod_create", "parse_entry", "parse_table",
    "parse_tables", "split_args", "table_from_json", "table_to_json",
]


def __getattr__(name: str) -> Any:  # the JSON and dm-init halves load on first use
    if name in ("table_to_json", "table_from_json"):
        from dmimage.table import jsonio

        return getattr(jsonio, name)
    if name in ("DmDevice", "dm_mod_create", "dm_mod_create_param", "parse_dm_mod_create"):
        from dmimage.table import dminit

        return getattr(dminit, name)
    raise AttributeError(name)
