"""The CLI's federation commands: ``edge-agent aggregator run`` and ``edge-agent keys``.

Kept apart from ``agent.fed.aggregator`` so that building the CLI imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import exit_codes


def cmd_aggregator_run(args: argparse.Namespace) -> int:
    from agent.fed.aggregator import run

    return run(Path(args.config))


def cmd_keys(args: argparse.Namespace) -> int:
    from agent.fed.signing import generate_keys

    try:
        private, public = generate_keys(Path(args.out), overwrite=args.force)
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return exit_codes.USAGE
    print(f"private key {private} (keep it at headquarters: hq.toml signing_key_file)")
    print(f"public key  {public} (give it to every box: [fleet] public_key_files)")
    return exit_codes.OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("aggregator", help="the federated aggregator (headquarters)")
    asub = a.add_subparsers(dest="aggregator_command", required=True)
    r = asub.add_parser("run", help="run an aggregator worker")
    r.add_argument("--config", required=True, help="hq.toml")
    r.set_defaults(func=cmd_aggregator_run)
    k = sub.add_parser("keys", help="make the fleet's Ed25519 key pair (fleet.key, fleet.pub)")
    k.add_argument("--out", required=True, help="directory for fleet.key and fleet.pub")
    k.add_argument(
        "--force", action="store_true", help="overwrite an existing key (boxes must get the new fleet.pub)"
    )
    k.set_defaults(func=cmd_keys)
