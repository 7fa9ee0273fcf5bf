"""dmimage: offline, kernel-compatible tools for device-mapper thin-pool metadata.

The public entry point for reading is :func:`open_pool`; see docs/architecture.md for layers.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_pool"]


def __getattr__(name: str):  # lazy: keep `import dmimage` cheap for the CLI
    if name == "open_pool":
        from dmimage.thin.pool import open_pool

        return open_pool
    raise AttributeError(name)
