"""dmimage: offline, kernel-compatible tools for device-mapper thin-pool metadata.

Entry points: :func:`open_pool` (read), :func:`open_writable` (offline edits),
:func:`check_metadata`; docs/api.md has a worked example, docs/architecture.md the layers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "check_metadata", "open_pool", "open_writable"]

_LAZY = {
    "open_pool": "dmimage.thin.pool",
    "open_writable": "dmimage.thin.transaction",
    "check_metadata": "dmimage.thin.check",
}


def __getattr__(name: str) -> Any:  # lazy: keep `import dmimage` cheap for the CLI
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
