"""``ttaserve eval``: run the benchmark protocols and write a table, a JSON file and plots.

The base ``ttaserve`` command imports this module only when ``eval`` is asked for, so the client stays light.
Three places to run the methods: ``--in-process`` (default, fastest), ``--url HOST:PORT`` (a running server that
serves the evaluation's repository: see ``--prepare-only``), ``--serve`` (start a server on a free local port
and go through gRPC, the whole serving path in one command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ttaserve.adapters.cache_dir import default_cache_dir

from . import plots
from .corruptions import CLEAN, CONSTANTS, CORRUPTIONS, FAMILIES
from .datasets import ImageSet, label_map, load_cifar10, load_fashion_mnist, load_image_folder
from .experts import ensure_expert, t3_domains, t3_methods
from .harness import DomainSpec, evaluate, make_domains, run_meta, run_protocol
from .inprocess import InProcessBackend
from .methods import STRATEGIES, Backend, strategy_methods
from .protocols import GROUPS, PROTOCOLS, resolve
from .remote import GrpcBackend
from .report import markdown
from .repository import CIFAR_MODEL, FASHION_MODEL, FASHION_REPOSITORY, add_t3_models, write_cifar_repository
from .results import Report

T3 = "t3"


def build_parser() -> argparse.ArgumentParser:
    description = "Run the test-time adaptation benchmark protocols; write a table, a JSON file and plots."
    parser = argparse.ArgumentParser(prog="ttaserve eval", description=description)
    protocols = ", ".join([*PROTOCOLS, *GROUPS, T3])
    parser.add_argument("--protocol", action="append", default=[], help=f"repeatable; one of {protocols}")
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated; LABEL=STRATEGY runs a strategy under its own label (default: %(default)s)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="LABEL.KEY=VALUE", help="override a setting of a strategy (label)"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="cifar10", help="cifar10, fashion-mnist, or a folder class_name/image.png")
    data.add_argument("--shared", type=Path, default=Path("../shared"), help="the shared folder (CIFAR-10, ResNet-20)")
    data.add_argument("--fashion-mnist-dir", type=Path, default=None, help="default: Debian's dataset-fashion-mnist")
    data.add_argument(
        "--corruptions", default=None, help=f"comma-separated names, families ({', '.join(FAMILIES)}), 'all', 'clean'"
    )
    data.add_argument("--severity", type=int, default=5)
    data.add_argument("--constants", choices=CONSTANTS, default="imagenet-c", help="corruption severity constants")
    data.add_argument("--images-per-domain", type=int, default=0, help="class-balanced subset per domain (0 = all)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/ttaserve")
    where = parser.add_argument_group("where the methods run").add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true", help="adapters in this process (the default)")
    where.add_argument("--url", default=None, help="a running server, host:port")
    where.add_argument("--serve", action="store_true", help="start a local server on the repository, use gRPC")
    model = parser.add_argument_group("model")
    model.add_argument("--model-repository", type=Path, default=None, help="default: written for the data")
    model.add_argument("--model", default=None, help="default: cifar10_resnet20 or fashion_mnist")
    model.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="gRPC deadline per request")
    model.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    t3 = parser.add_argument_group("T3 (--protocol t3, CIFAR-10 only)")
    t3.add_argument("--t3-families", default="noise", help=f"expert families, comma-separated: {', '.join(FAMILIES)}")
    t3.add_argument("--expert-epochs", type=float, default=2.0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("eval-results"), help="results.json, results.md, plots")
    out.add_argument("--plot-dir", type=Path, default=None, help="where the PNG plots go (default: --out)")
    out.add_argument("--plot-prefix", default="", help="prefix of the PNG file names")
    out.add_argument("--smooth", type=int, default=1, help="moving average (batches) of the running-error plot")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--prepare-only", action="store_true", help="write the model repository (and experts), exit")
    out.add_argument(
        "--report", type=Path, default=None, help="re-render tables and plots from a results.json, run nothing"
    )
    return parser


def _corruptions(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        names += CORRUPTIONS if token == "all" else FAMILIES.get(token, (token,))
    return tuple(dict.fromkeys(names))


def _overrides(items: Sequence[str]) -> dict[str, dict[str, bool | int | float | str]]:
    """``tent.lr=0.0005`` -> {"tent": {"lr": 0.0005}}; values are JSON when they parse, else strings."""
    overrides: dict[str, dict[str, bool | int | float | str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        strategy, dot, name = key.partition(".")
        if not (sep and dot and strategy and name):
            raise ValueError(f"--set expects STRATEGY.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        overrides.setdefault(strategy, {})[name] = value
    return overrides


def _repository(args: argparse.Namespace, cache_dir: Path) -> tuple[Path | None, str]:
    """The repository and model to evaluate: given, written for the data set, or (None) the server's at --url."""
    if args.model_repository is not None:
        if args.model is None:
            raise ValueError("--model-repository needs --model")
        return args.model_repository, args.model
    if args.data == "cifar10":
        checkpoint = args.shared / "models" / "cifar10" / "resnet20-12fca82f.th"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: the shared ResNet-20 is missing (see --shared)")
        source = args.shared / "data" / "cifar10" / "train10k.npz"
        root = write_cifar_repository(cache_dir / "repository", checkpoint, source if source.is_file() else None)
        return root, args.model or CIFAR_MODEL
    if args.data == "fashion-mnist":
        return FASHION_REPOSITORY, args.model or FASHION_MODEL
    if args.url is not None and args.model is not None:
        return None, args.model
    raise ValueError(f"--data {args.data}: a folder needs --model-repository and --model (or --url and --model)")


def _load_data(args: argparse.Namespace, backend: Backend) -> ImageSet:
    if args.data == "cifar10":
        return load_cifar10(args.shared / "data" / "cifar10" / "test.npz")
    if args.data == "fashion-mnist":
        return load_fashion_mnist(*([args.fashion_mnist_dir] if args.fashion_mnist_dir else []))
    data = load_image_folder(Path(args.data), *backend.input_shape(backend.model))
    for skipped in data.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    return data


@contextlib.contextmanager
def _backend(args: argparse.Namespace, repository: Path | None, model: str) -> Iterator[Backend]:
    if args.url is None:
        if repository is None:
            raise ValueError("--in-process and --serve need a model repository (--model-repository)")
        if not args.serve:
            yield InProcessBackend(repository, model)
            return
    handle = None
    url = args.url
    if args.serve:
        from ttaserve.server.app import start_server
        from ttaserve.server.settings import ServerSettings

        settings = ServerSettings(
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_port=None,
            metrics_port=None,
            model_repository=repository,
            log_level="WARNING",
        )
        handle = start_server(settings)
        url = f"127.0.0.1:{handle.grpc_port}"
    backend = GrpcBackend(url, model, timeout_s=args.timeout)
    try:
        yield backend
    finally:
        backend.close()
        if handle is not None:
            handle.stop()


def run(args: argparse.Namespace, command: str = "") -> Report | None:
    """Everything ``ttaserve eval`` does, from parsed arguments; None with ``--prepare-only``."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cache_dir = args.cache_dir or default_cache_dir()
    names = args.protocol or ["continual"]
    protocols = resolve([n for n in names if n != T3])
    families = [f for f in args.t3_families.split(",") if f] if T3 in names else []
    if families and args.data != "cifar10":
        raise ValueError("--protocol t3 needs --data cifar10 (experts are fine-tuned from the shared ResNet-20)")
    repository, model = _repository(args, cache_dir)
    t3_models = {}
    checkpoint = args.shared / "models" / "cifar10" / "resnet20-12fca82f.th"
    train = args.shared / "data" / "cifar10" / "train10k.npz"
    for family in families:
        assert repository is not None  # CIFAR-10 always has one
        expert = ensure_expert(family, args.severity, args.seed, checkpoint, train, cache_dir, args.expert_epochs)
        t3_models[family] = add_t3_models(repository, family, expert)
    if args.prepare_only:
        print(f"model repository: {repository} (serve it: ttaserve serve --model-repository {repository})")
        return None
    default_corruptions = "all" if args.data in ("cifar10", "fashion-mnist") else CLEAN
    corruptions = _corruptions(args.corruptions or default_corruptions)
    spec = DomainSpec(corruptions, args.severity, args.constants, args.images_per_domain, args.seed)
    methods = strategy_methods(args.strategies.split(","), _overrides(args.set))
    progress = not args.no_progress
    with _backend(args, repository, model) as backend:
        data = _load_data(args, backend)
        if protocols:
            report = evaluate(backend, data, protocols, methods, spec, cache_dir, progress)
        else:
            report = Report(run_meta(backend, data, spec))
        start = time.perf_counter()
        for family, models in t3_models.items():
            t3_spec = DomainSpec(t3_domains(family), args.severity, args.constants, args.images_per_domain, args.seed)
            domains = make_domains(data, t3_spec, label_map(data.classes, backend.labels(model)), cache_dir)
            mixed = PROTOCOLS["mixed"]
            result = run_protocol(backend, mixed, domains, t3_methods(models), args.seed, progress, f"t3-{family}")
            result.description = f"T3 with the {family} expert: clean and {family} images mixed, batch 200"
            report.protocols.append(result)
        report.meta["seconds"] = round(report.meta.get("seconds", 0) + time.perf_counter() - start, 1)
    report.meta["command"] = command
    return report


def write_outputs(report: Report, args: argparse.Namespace) -> list[Path]:
    args.out.mkdir(parents=True, exist_ok=True)
    report.save(args.out / "results.json")
    (args.out / "results.md").write_text(markdown(report))
    written = [args.out / "results.json", args.out / "results.md"]
    if not args.no_plots:
        written += plots.plot_report(report, args.plot_dir or args.out, args.plot_prefix, args.smooth)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    report = Report.load(args.report) if args.report else run(args, shlex.join(["ttaserve", "eval", *argv]))
    if report is None:
        return 0
    written = write_outputs(report, args)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
