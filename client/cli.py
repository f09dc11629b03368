"""The ``ttaserve`` command: run a server, classify images, list models, strategies and sessions, manage a session,
export to ONNX, evaluate.

The client commands need only the SDK; ``serve``, ``export-onnx`` and ``eval`` import the server package (torch)
when they run, so ``ttaserve classify`` stays fast and works with the base install. Failures print one line to
stderr and exit 1 — no tracebacks for a wrong URL or a bad image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .client import Client
from .core import DEFAULT_URL
from .results import BatchResult
from .table import format_table


def _setting(text: str) -> tuple[str, bool | int | float | str]:
    """``KEY=VALUE``; VALUE is read as JSON when it is a number or boolean, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if not isinstance(value, bool | int | float | str):
        value = raw
    return key, value


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server address host:port (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline per call")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--root-certificates", type=Path, default=None, help="PEM file to verify the server with")
    parser.add_argument("--client-cert", type=Path, default=None, help="PEM certificate chain (mutual TLS)")
    parser.add_argument("--client-key", type=Path, default=None, help="PEM private key of --client-cert")
    parser.add_argument(
        "--server-name", default=None, help="name to verify the server's certificate against (default: the URL host)"
    )
    parser.add_argument("--caller", default=None, help="caller identity (ttaserve-caller metadata)")


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.url,
        timeout_s=args.timeout,
        tls=args.tls,
        root_certificates=args.root_certificates,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        server_name=args.server_name,
        caller=args.caller,
        shared_memory=getattr(args, "shared_memory", False),
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttaserve", description="Serve image classifiers with test-time adaptation, and talk to such a server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server: gRPC and REST (needs ttaserve[server])")
    serve.add_argument("--config", type=Path, default=None, help="YAML settings file")
    serve.add_argument("--model-repository", type=Path, default=None, help="default: the embedded model")
    serve.add_argument(
        "--repository-poll-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="reload models whose files change, load new folders, unload removed ones (default: off)",
    )
    serve.add_argument("--host", default=None, help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, default=None, help="default 8001; 0 picks a free port")
    serve.add_argument("--http-port", type=int, default=None, help="v2 REST port (default 8000); 0 picks a free port")
    serve.add_argument("--no-http", action="store_true", help="no REST endpoint (gRPC only)")
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 8002)")
    serve.add_argument("--no-metrics", action="store_true", help="no Prometheus endpoint")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    serve.add_argument("--max-message-mb", type=int, default=None)
    serve.add_argument(
        "--frontend", choices=("auto", "native", "python"), default=None, help="gRPC transport (default auto)"
    )
    serve.add_argument(
        "--snapshot-dir", type=Path, default=None, help="session snapshots (share it between replicas for failover)"
    )
    serve.add_argument(
        "--allow-shared-memory",
        action="store_const",
        const=True,
        default=None,
        help="let clients on this host pass tensors through /dev/shm (Triton's system shared-memory extension)",
    )
    serve.add_argument("--log-format", choices=("text", "json"), default=None, help="json: one object per line")
    serve.add_argument(
        "--log-requests", action="store_const", const=True, default=None, help="log every inference request"
    )
    serve.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: TLS on gRPC and REST")
    serve.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", type=Path, default=None, help="PEM CA bundle: clients must present a certificate it signed"
    )

    classify = commands.add_parser("classify", help="classify image files")
    _add_connection(classify)
    classify.add_argument("--model", default=None, help="default: the server's only model")
    classify.add_argument("--version", default=None)
    classify.add_argument("--strategy", default="none", help="adaptation strategy (see 'ttaserve strategies')")
    classify.add_argument("--setting", type=_setting, action="append", default=[], metavar="KEY=VALUE")
    classify.add_argument("--session", default=None, metavar="ID", help="adapt across the batches of one session")
    classify.add_argument(
        "--resume", action="store_true", help="continue the session's state on the server instead of starting afresh"
    )
    classify.add_argument("--keep", action="store_true", help="leave the session open on the server when done")
    classify.add_argument("--batch-size", type=int, default=0, help="images per request (default: all in one)")
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument(
        "--shared-memory",
        action="store_true",
        help="pass the batches through /dev/shm (a server on this host started with --allow-shared-memory)",
    )
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE")

    models = commands.add_parser("models", help="list the repository's models")
    _add_connection(models)

    sessions = commands.add_parser("sessions", help="list the adaptation sessions (yours, or every caller's)")
    _add_connection(sessions)
    sessions.add_argument("--model", default=None, help="only this model's sessions")
    sessions.add_argument("--all-callers", action="store_true", help="every caller's sessions, not only yours")

    session = commands.add_parser("session", help="inspect, reset, end, snapshot or restore one session")
    _add_connection(session)
    session.add_argument("action", choices=SESSION_ACTIONS)
    session.add_argument("sequence_id", metavar="SEQUENCE_ID")
    session.add_argument("--model", default=None, help="default: the server's only model")
    session.add_argument("--strategy", required=True, help="the session's strategy (part of its key)")
    session.add_argument(
        "--file",
        type=Path,
        default=None,
        help="snapshot: write the state here (else the server writes its snapshot file); restore: read it from here "
        "(else the server's snapshot file)",
    )

    strategies = commands.add_parser("strategies", help="list the adaptation strategies")
    _add_connection(strategies)
    strategies.add_argument("--model", default=None, help="only those this model can run")

    export = commands.add_parser("export-onnx", help="export a PyTorch model to ONNX and check parity")
    export.add_argument("--model-repository", type=Path, default=None, help="default: the embedded model")
    export.add_argument("--model", default=None, help="default: the repository's only model")
    export.add_argument("--version", type=int, default=None, help="default: the latest")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--sample", type=Path, default=None, help=".npz with 'x' uint8 NHWC: real parity inputs")
    export.add_argument("--rtol", type=float, default=1e-4, help="largest relative logit difference")

    # Its options live in ttaserve.evaluation.cli (imported only when it runs); 'ttaserve eval --help' lists them.
    commands.add_parser("eval", add_help=False, help="run the TTA benchmark protocols (needs ttaserve[eval])")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from ttaserve.server.app import serve
    from ttaserve.server.settings import ServerSettings

    settings = ServerSettings.from_sources(
        args.config,
        model_repository=args.model_repository,
        grpc_host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        device=args.device,
        max_message_mb=args.max_message_mb,
        frontend=args.frontend,
        snapshot_dir=args.snapshot_dir,
        repository_poll_s=args.repository_poll_s,
        allow_shared_memory=args.allow_shared_memory,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        log_format=args.log_format,
        log_requests=args.log_requests,
    )
    if args.no_metrics:
        settings = settings.model_copy(update={"metrics_port": None})
    if args.no_http:
        settings = settings.model_copy(update={"http_port": None})
    serve(settings)
    return 0


def _top_k(result: BatchResult, row: int) -> str:
    return ", ".join(f"{p.label} {p.score:.3f}" for p in result[row].top_k)


def _classify(args: argparse.Namespace) -> int:
    images: list[Path] = args.images
    size = args.batch_size if args.batch_size > 0 else len(images)
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    settings = dict(args.setting)
    rows: list[list[object]] = []
    with _client(args) as client:
        session = None
        if args.session is not None:
            session = client.session(
                args.session, args.model, args.strategy, settings, args.version, resume=args.resume
            )
        try:
            for batch in batches:
                if session is not None:
                    result = session.classify(batch, top_k=args.top_k)
                else:
                    result = client.classify(batch, args.model, args.strategy, args.top_k, settings, args.version)
                for row, path in enumerate(batch):
                    rows.append([str(path), result[row].label, f"{result[row].score:.3f}", _top_k(result, row)])
        finally:
            if session is not None and not args.keep:
                session.end()
    print(format_table(["file", "label", "score", f"top-{args.top_k}"], rows))
    stats = ", ".join(f"{key} {value:.4g}" for key, value in result.stats.items())
    where = f"{result.model} v{result.version}" if result.version else result.model
    print(f"\n{where}: strategy {result.strategy or args.strategy} on {result.engine or '?'}/{result.device or '?'}")
    if stats:
        print(f"last batch: {stats}")
    return 0


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        entries = client.models()
    rows = [[m.name, m.version, m.state, m.reason] for m in entries]
    print(format_table(["name", "version", "state", "reason"], rows))
    return 0


def _ago(unix: float, now: float) -> str:
    seconds = max(0.0, now - unix)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _sessions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sessions = client.sessions(args.model, all_callers=args.all_callers)
    now = time.time()
    rows = [
        [
            s.caller,
            s.model,
            s.strategy,
            s.sequence_id,
            s.steps,
            s.resets,
            f"{s.state_bytes / 2**20:.2f}",
            "disk" if s.spilled else "memory",
            _ago(s.last_used_unix, now),
        ]
        for s in sorted(sessions, key=lambda s: (s.model, s.strategy, s.caller, s.sequence_id))
    ]
    headers = ["caller", "model", "strategy", "sequence id", "steps", "resets", "state MiB", "held in", "last used"]
    print(format_table(headers, rows))
    return 0


SESSION_ACTIONS = ("info", "reset", "end", "snapshot", "restore")


def _session(args: argparse.Namespace) -> int:
    """One session's action; info, reset and restore print the session as it then is."""
    with _client(args) as client:
        session = client.session(args.sequence_id, args.model, args.strategy, resume=True)
        if args.action == "end":
            session.end()
            print(f"session {args.sequence_id!r} ended")
            return 0
        if args.action == "snapshot":
            snapshot = session.snapshot(return_data=args.file is not None)
            if args.file is not None:
                args.file.write_bytes(snapshot.data)
            where = args.file if args.file is not None else f"{snapshot.path} on the server"
            print(f"session {args.sequence_id!r}: {snapshot.byte_size} bytes written to {where}")
            return 0
        if args.action == "restore":
            info = session.restore(args.file.read_bytes() if args.file is not None else b"")
        elif args.action == "reset":
            info = session.reset()
        else:
            info = session.info()
    now = time.time()
    rows = [
        ["caller", info.caller],
        ["model", f"{info.model} v{info.model_version}" if info.model_version else info.model],
        ["strategy", info.strategy],
        ["sequence id", info.sequence_id],
        ["steps", info.steps],
        ["resets", info.resets],
        ["state MiB", f"{info.state_bytes / 2**20:.2f}"],
        ["held in", "disk" if info.spilled else "memory"],
        ["created", _ago(info.created_unix, now)],
        ["last used", _ago(info.last_used_unix, now)],
        ["settings", json.dumps(info.settings, separators=(",", ":"))],
        *([f"last {key}", f"{value:.4g}"] for key, value in sorted(info.last_stats.items())),
    ]
    print(format_table(["field", "value"], rows))
    return 0


def _shorten(text: str, width: int = 60) -> str:
    """Keep a table readable; the full schema is in ``Client.list_strategies``."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _strategies(args: argparse.Namespace) -> int:
    with _client(args) as client:
        strategies = client.list_strategies(args.model)
    rows = [
        [
            s.name,
            "yes" if s.stateful else "no",
            "yes" if s.uses_gradients else "no",
            ",".join(s.requires) or "-",
            _shorten(json.dumps(s.defaults, separators=(",", ":"))),
            s.description,
        ]
        for s in strategies
    ]
    print(format_table(["name", "stateful", "gradients", "requires", "defaults", "description"], rows))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ttaserve.evaluation.cli import main as evaluation_main

    return evaluation_main(args.eval_args)


def _export_onnx(args: argparse.Namespace) -> int:
    from ttaserve.server.export_command import run_export

    report = run_export(
        args.model_repository, args.model, args.version, args.out, sample=args.sample, opset=args.opset, rtol=args.rtol
    )
    print(report.summary())
    return 0 if report.ok else 1


_COMMANDS = {
    "serve": _serve,
    "classify": _classify,
    "models": _models,
    "sessions": _sessions,
    "session": _session,
    "strategies": _strategies,
    "export-onnx": _export_onnx,
    "eval": _eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "eval":
        args.eval_args = extra  # parsed by ttaserve.evaluation.cli
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except ImportError as exc:
        extra = "eval" if args.command == "eval" else "server"
        hint = f"the {extra} commands need 'pip install ttaserve[{extra}]'"
        print(f"ttaserve {args.command}: {exc} ({hint})", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI's contract: one line, no traceback
        print(f"ttaserve {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
