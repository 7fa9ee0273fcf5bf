"""The `dmimage` command line: one module per subcommand, discovered automatically.

A subcommand module defines ``register(subparsers) -> None``, which adds its parser and sets
``func`` (``args -> int``) as a default. Argument handling only: the work lives in the library.
"""
