"""`dmimage message META MSG...`: apply thin-pool messages offline, then commit once."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "message", help="apply thin-pool messages (create_thin, create_snap, delete, ...) offline",
        description="The same strings as `dmsetup message POOL 0 MSG`: create_thin ID, "
        "create_snap ID ORIGIN, delete ID, set_transaction_id OLD NEW, reserve_metadata_snap, "
        "release_metadata_snap. All messages form one transaction, committed crash-safely at "
        "the end; if one fails, nothing is written.")
    p.add_argument("metadata", metavar="META")
    p.add_argument("messages", metavar="MSG", nargs="+", help="one quoted message per argument")
    add_lock_plan(p, lambda a: [(a.metadata, True)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.thin.transaction import open_writable

    with open_writable(args.metadata) as pool:
        for text in args.messages:
            pool.message(text)
        pool.commit()
    return 0
