"""The CLI's federation commands: ``edge-agent aggregator run`` and ``edge-agent keys``.

Kept apart from ``agent.fed.aggregator`` so that building the CLI imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import __version__, exit_codes


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


def cmd_model_publish(args: argparse.Namespace) -> int:
    """``edge-agent model publish BUNDLE --config hq.toml``: register a release the aggregator rolls out."""
    from agent.config import ConfigError
    from agent.fed.bundle_server import register_release
    from agent.fed.hq_config import load_hq_config
    from agent.fed.hq_store import HqStore
    from agent.fed.signing import load_private_key

    try:
        config = load_hq_config(Path(args.config))
    except ConfigError as e:
        for line in e.errors:
            print(f"{args.config}: {line}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    store = HqStore(config.db_path)
    try:
        release = register_release(
            store,
            config.data_dir,
            config.fleet,
            Path(args.bundle),
            load_private_key(config.signing_key_path()),
            canary=[d for d in (args.canary or "").split(",") if d],
            percent=args.percent,
            min_agent_version=args.min_agent_version or __version__,
            chunk_bytes=args.chunk_bytes or config.chunk_bytes,
        )
    finally:
        store.close()
    size = sum(f.size for f in release.files)
    print(
        f"release {release.release}: {release.name}, {len(release.files)} files, {size} bytes, base "
        f"{release.base_hash[:12]}, stage {release.rollout.stage}; the leading aggregator worker publishes it"
    )
    return exit_codes.OK


def add_model_publish(model_sub: argparse._SubParsersAction) -> None:
    """``model publish``, under the CLI's ``model`` command."""
    p = model_sub.add_parser("publish", help="release a bundle to the fleet (headquarters)")
    p.add_argument("bundle", help="bundle directory (edge-agent model build)")
    p.add_argument("--config", required=True, help="hq.toml: fleet, signing key, aggregator data_dir")
    p.add_argument("--canary", help="comma list of devices that take it first")
    p.add_argument("--percent", type=float, default=0.0, help="share of the fleet that takes it first")
    p.add_argument("--min-agent-version", help="lowest agent version that can serve it (default: this one)")
    p.add_argument(
        "--chunk-bytes", type=int, help="chunk size of the transfer (default: hq.toml's chunk_bytes)"
    )
    p.set_defaults(func=cmd_model_publish)


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
