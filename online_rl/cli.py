"""`alignloop feedback ...`: operator commands on the feedback store (export, retention purge).

    alignloop feedback export --what pairs --style trl --format parquet --output runs/pairs
    alignloop feedback purge  --store "sqlite:///runs/alignloop.db?retention_days=30"

The store URL comes from `--store`, else the ALIGNLOOP_STORE_URL environment variable, else the embedded default.
"""

from __future__ import annotations

import argparse
import json
import os

DEFAULT_STORE_URL = "sqlite:///runs/alignloop.db"


def add_feedback_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="feedback_action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write raw events or preference pairs with their images")
    export.add_argument("--what", choices=("events", "pairs"), default="pairs")
    export.add_argument("--style", choices=("trl", "rlhfv"), default="trl", help="pair format (with --what pairs)")
    export.add_argument("--format", dest="fmt", choices=("jsonl", "parquet"), default="jsonl")
    export.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    purge = actions.add_parser("purge", help="delete generation records older than the store's retention_days")
    for sub in (export, purge):
        sub.add_argument(
            "--store", default=None, help=f"store URL (default: $ALIGNLOOP_STORE_URL or {DEFAULT_STORE_URL})"
        )


def store_url(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("ALIGNLOOP_STORE_URL") or DEFAULT_STORE_URL


def run_feedback(args: argparse.Namespace) -> int:
    from online_rl.store import open_store

    url = store_url(args)
    if url.startswith("sqlite:///"):
        from pathlib import Path

        path = url.removeprefix("sqlite:///").split("?")[0]
        if not Path(path).is_file():  # opening would create an empty store: say so instead
            raise FileNotFoundError(f"no store at {path}")
    with open_store(url) as store:
        if args.feedback_action == "export":
            from online_rl.export import export_feedback

            summary = export_feedback(store, args.output, what=args.what, style=args.style, fmt=args.fmt)
        else:
            summary = store.purge_expired()
    print(json.dumps(summary))
    return 0
