"""Docker's devicemapper storage (Engine <= 24), read offline from a data root.

``store.open_store(ROOT)`` reads Docker's bookkeeping (device JSON, layerdb, imagedb, tags,
containers) into a typed model; ``report`` lists it, ``check`` cross-checks it against the
thin pool, and ``export`` writes a device's bytes through the thin export. Nothing under ROOT
is ever written, and every name read from a file that becomes a path is confined to ROOT
(``paths``).
"""
