"""The evaluation harness on real data: a small version of the protocols, in-process and through a real server.

The CIFAR-10 checks need ../shared (the test set and the pretrained ResNet-20) and skip without it; the
Fashion-MNIST checks need only Debian's data set and the embedded default model. The orderings asserted here are
the field's well-known ones, measured first on these exact subsets (numbers in the comments).
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import CIFAR_TEST, CIFAR_TRAIN, RESNET20, SHARED, requires_fashion_mnist, requires_shared, start

import ttaserve.evaluation
from ttaserve.client.cli import main as ttaserve_main
from ttaserve.evaluation.cache import corrupted
from ttaserve.evaluation.corruptions import corrupt_images
from ttaserve.evaluation.datasets import load_cifar10, load_fashion_mnist, load_image_folder
from ttaserve.evaluation.experts import ensure_expert, expert_path, t3_domains, t3_methods
from ttaserve.evaluation.harness import DomainSpec, evaluate, make_domains, run_protocol
from ttaserve.evaluation.inprocess import InProcessBackend
from ttaserve.evaluation.methods import strategy_methods
from ttaserve.evaluation.protocols import PROTOCOLS, resolve
from ttaserve.evaluation.remote import GrpcBackend
from ttaserve.evaluation.repository import (
    CIFAR_MODEL,
    FASHION_MODEL,
    FASHION_REPOSITORY,
    add_t3_models,
    write_cifar_repository,
)
from ttaserve.evaluation.results import Report
from ttaserve.evaluation.streams import Domain, build_stream
from ttaserve.server.architectures import load_model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def cifar_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (RESNET20.is_file() and CIFAR_TRAIN.is_file()):
        pytest.skip(f"needs the shared ResNet-20 and training images at {SHARED}")
    return write_cifar_repository(tmp_path_factory.mktemp("eval-repo"), RESNET20, CIFAR_TRAIN)


# --- streams and corruptions (no data needed beyond a few arrays) -------------------------------------------------


def _toy_domains(per_class: int = 100) -> list[Domain]:
    labels = np.repeat(np.arange(10), per_class)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    return [Domain("a", images, labels), Domain("b", images, labels)]


def test_label_order_goes_from_iid_to_sorted() -> None:
    domains = _toy_domains()
    classes = {
        order: build_stream(domains, 64, order, seed=1).classes_per_batch() for order in ("iid", "dirichlet", "sorted")
    }
    assert classes["iid"] > 9 > 5 > classes["dirichlet"] > classes["sorted"], classes
    wide = build_stream(domains, 64, "dirichlet", delta=100.0, seed=1).classes_per_batch()
    assert wide > classes["dirichlet"]  # a large δ spreads every class over the stream


def test_batches_keep_to_their_domain_and_reset_where_asked() -> None:
    domains = _toy_domains()
    continual = build_stream(domains, 300, "iid", seed=0)
    assert [len(b.labels) for b in continual.batches] == [300, 300, 300, 100] * 2
    assert all(len(set(b.domains.tolist())) == 1 for b in continual.batches)
    assert [b.reset for b in continual.batches] == [True] + [False] * 7
    reset = build_stream(domains, 300, "iid", reset_each_domain=True, seed=0)
    assert [b.reset for b in reset.batches] == [True, False, False, False] * 2
    mixed = build_stream(domains, 200, "iid", mixed=True, seed=0)
    assert sum(len(set(b.domains.tolist())) == 2 for b in mixed.batches) == len(mixed.batches)
    again = build_stream(domains, 300, "iid", seed=0)
    assert all(np.array_equal(x.labels, y.labels) for x, y in zip(continual.batches, again.batches, strict=True))


def test_one_strategy_runs_under_two_labels_with_its_own_settings() -> None:
    methods = strategy_methods(["unmix_tns", "unmix_exact=unmix_tns"], {"unmix_exact": {"exact_init": True}})
    assert [(m.label, m.strategy) for m in methods] == [("unmix_tns", "unmix_tns"), ("unmix_exact", "unmix_tns")]
    assert "exact_init" not in methods[0].settings and methods[1].settings["exact_init"] is True


def test_every_method_label_but_the_source_gets_a_colour_other_than_grey() -> None:
    from ttaserve.evaluation.plots import _colour

    labels = ["tbn", "unmix_exact", *(f"variant-{i}" for i in range(40))]
    assert all(_colour(label) not in ("#7f7f7f", "#c7c7c7") for label in labels)
    assert _colour("unmix_exact") != _colour("unmix_tns") and _colour("x") == _colour("x")


def test_protocol_groups_expand() -> None:
    assert [p.batch_size for p in resolve(["sweep"])] == [1, 16, 64, 200]
    assert [p.name for p in resolve(["continual", "all"])][:2] == ["continual", "reset"]
    with pytest.raises(ValueError, match="unknown protocol 'bogus'"):
        resolve(["bogus"])


@requires_fashion_mnist
def test_corruptions_are_cached_and_cifar10c_constants_are_milder(cache_dir: Path) -> None:
    data = load_fashion_mnist()
    small = data.select(data.balanced_indices(200, seed=0))
    first = corrupted(small, "gaussian_noise", 5, "imagenet-c", 0, cache_dir)
    files = list((cache_dir / "corruptions" / small.fingerprint()).rglob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(corrupted(small, "gaussian_noise", 5, "imagenet-c", 0, cache_dir), first)
    mild = corrupted(small, "gaussian_noise", 5, "cifar10c", 0, cache_dir)
    change = {name: np.abs(x.astype(int) - small.images).mean() for name, x in (("imagenet", first), ("c10c", mild))}
    assert 0 < change["c10c"] < change["imagenet"], change  # σ 0.10 against 0.38
    assert first.shape == small.images.shape == (200, 28, 28, 1)
    with pytest.raises(ValueError, match="for cifar10c constants"):
        corrupt_images(small.images, "glass_blur", 5, constants="cifar10c")


# --- Fashion-MNIST: runs without ../shared -----------------------------------------------------------------------


@requires_fashion_mnist
def test_the_package_example_runs(cache_dir: Path) -> None:
    result = doctest.testmod(ttaserve.evaluation, extraglobs={"cache_dir": cache_dir})
    assert result.attempted > 5 and result.failed == 0


@requires_fashion_mnist
def test_fashion_mnist_tbn_beats_source_on_noise_in_process_and_over_grpc(cache_dir: Path) -> None:
    # Embedded default model, 600 test images, severity-5 Gaussian noise: none 85 %, tbn 35 % (measured).
    data = load_fashion_mnist()
    spec = DomainSpec(("gaussian_noise",), images_per_domain=600)
    methods = strategy_methods(["none", "tbn"])
    local = evaluate(
        InProcessBackend(FASHION_REPOSITORY, FASHION_MODEL),
        data,
        resolve(["continual"]),
        methods,
        spec,
        cache_dir,
        False,
    )
    errors = {m.label: m.errors["gaussian_noise"] for m in local.protocol("continual").methods}
    assert errors["tbn"] < errors["none"] - 30, errors
    handle = start(None)  # the embedded default model, over real gRPC
    backend = GrpcBackend(f"127.0.0.1:{handle.grpc_port}", FASHION_MODEL)
    try:
        remote = evaluate(backend, data, resolve(["continual"]), methods, spec, cache_dir, False)
    finally:
        backend.close()
        handle.stop()
    assert [m.errors for m in remote.protocol("continual").methods] == [
        m.errors for m in local.protocol("continual").methods
    ]


@requires_fashion_mnist
def test_image_folder_skips_unreadable_files_and_the_cli_writes_its_outputs(tmp_path: Path, cache_dir: Path) -> None:
    data = load_fashion_mnist()
    root = tmp_path / "images"
    keep = [i for i in data.balanced_indices(50, seed=0) if data.labels[i] != 0]  # "T-shirt/top" is no folder name
    for i in keep:
        folder = root / data.classes[data.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, :, :, 0]).save(folder / f"{i}.png")
    png = next((root / "Bag").iterdir()).read_bytes()
    (root / "Bag" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "Coat" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(png)

    folder = load_image_folder(root, 28, 28, channels=1)
    assert len(folder) == len(keep) == 45 and folder.images.shape == (45, 28, 28, 1)
    reasons = {Path(s.path).name: s.reason for s in folder.skipped}
    assert set(reasons) == {"truncated.png", "notes.txt", "stray.png"}, reasons
    assert "class folder" in reasons["stray.png"] and "Error" in reasons["notes.txt"]

    (root / "Bag").rename(root / "Handbag")
    with pytest.raises(ValueError, match=r"\['Handbag'\] are not among the model's labels"):
        backend = InProcessBackend(FASHION_REPOSITORY, FASHION_MODEL)
        evaluate(backend, load_image_folder(root, 28, 28, 1), [], [], DomainSpec(("clean",)), cache_dir, False)
    (root / "Handbag").rename(root / "Bag")

    out = tmp_path / "out"
    argv = ["eval", "--data", str(root), "--model-repository", str(FASHION_REPOSITORY), "--model", FASHION_MODEL]
    argv += ["--corruptions", "clean,gaussian_noise", "--strategies", "none,tbn", "--protocol", "reset"]
    argv += ["--cache-dir", str(cache_dir), "--out", str(out), "--no-progress"]
    assert ttaserve_main(argv) == 0
    report = Report.load(out / "results.json")
    assert len(report.meta["skipped_files"]) == 3
    assert report.meta["command"].startswith("ttaserve eval --data")
    result = report.protocol("reset")
    assert result.domains == ["clean", "gaussian_noise"] and [m.label for m in result.methods] == ["none", "tbn"]
    assert 0 <= result.method("none").errors["clean"] < 40
    assert "| gaussian_noise |" in (out / "results.md").read_text()
    for name in ("reset-errors.png", "reset-running.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- CIFAR-10 and the pretrained ResNet-20 (../shared) -------------------------------------------------------------


@requires_shared
def test_cifar_protocols_order_the_methods_as_the_field_expects(cifar_repository: Path, cache_dir: Path) -> None:
    # 1,000 images per domain. Measured: continual noise none 88.4, tbn 79.4; class-sorted stream mean of clean and
    # noise: tbn 79.3 (it collapses to the batch's class), unmix_tns 51.8, source 48.1.
    data = load_cifar10(CIFAR_TEST)
    spec = DomainSpec(("clean", "gaussian_noise"), images_per_domain=1000)
    backend = InProcessBackend(cifar_repository, CIFAR_MODEL)
    methods = strategy_methods(["none", "tbn", "unmix_tns"])
    report = evaluate(backend, data, resolve(["continual", "sorted"]), methods, spec, cache_dir, False)
    continual, ordered = report.protocol("continual"), report.protocol("sorted")
    assert continual.method("tbn").errors["gaussian_noise"] < continual.method("none").errors["gaussian_noise"] - 5
    assert ordered.method("unmix_tns").mean < ordered.method("tbn").mean - 10
    assert ordered.method("tbn").errors["clean"] > ordered.method("none").errors["clean"] + 40
    assert ordered.classes_per_batch < 2 < 9 < continual.classes_per_batch
    assert json.loads(report.to_json())["protocols"][0]["methods"][0]["batch_errors"]


@requires_shared
def test_a_grpc_run_matches_the_in_process_run(cifar_repository: Path, cache_dir: Path) -> None:
    # Sessions reset at each corruption through sequence_start: a stateful, training strategy (tent) must give the
    # same errors through the server as in-process, where Adapter.reset() does it.
    data = load_cifar10(CIFAR_TEST)
    spec = DomainSpec(("gaussian_noise", "contrast"), images_per_domain=400)
    methods = strategy_methods(["none", "tent"])
    protocols = resolve(["reset"])
    local = evaluate(InProcessBackend(cifar_repository, CIFAR_MODEL), data, protocols, methods, spec, cache_dir, False)
    handle = start(cifar_repository)
    backend = GrpcBackend(f"127.0.0.1:{handle.grpc_port}", CIFAR_MODEL)
    try:
        remote = evaluate(backend, data, protocols, methods, spec, cache_dir, False)
        assert backend.client.sessions(CIFAR_MODEL) == []  # every stream's session was ended
    finally:
        backend.close()
        handle.stop()
    for here, there in zip(local.protocol("reset").methods, remote.protocol("reset").methods, strict=True):
        assert here.errors == pytest.approx(there.errors, abs=0.5), here.label
    assert remote.meta["backend"].startswith("gRPC")


@requires_shared
def test_t3_experts_are_cached_and_compared_with_their_endpoints(
    cifar_repository: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # A token expert (a few optimiser steps through the documented finetune-expert command): this checks the
    # plumbing (cache, repository, the five methods), not T3's accuracy, which docs/results.md measures.
    expert = ensure_expert("noise", 5, 0, RESNET20, CIFAR_TRAIN, tmp_path, epochs=0.03)
    assert expert == expert_path(tmp_path, "noise", 5, 0) and expert.is_file()
    stamp = expert.stat().st_mtime_ns
    assert ensure_expert("noise", 5, 0, RESNET20, CIFAR_TRAIN, tmp_path, epochs=0.03).stat().st_mtime_ns == stamp
    names = add_t3_models(cifar_repository, "noise", expert)
    merged = torch.load(cifar_repository / names["merge50"] / "1" / "model.pt")
    ends = [load_model("cifar_resnet20", p).state_dict() for p in (RESNET20, expert)]
    assert all(
        torch.allclose(merged[k], (ends[0][k] + ends[1][k]) / 2) for k in merged if merged[k].is_floating_point()
    )

    data = load_cifar10(CIFAR_TEST)
    backend = InProcessBackend(cifar_repository, CIFAR_MODEL)
    spec = DomainSpec(t3_domains("noise"), images_per_domain=100)
    domains = make_domains(data, spec, np.arange(10), cache_dir)
    result = run_protocol(backend, PROTOCOLS["mixed"], domains, t3_methods(names), progress=False, name="t3-noise")
    assert [m.label for m in result.methods] == ["generalist", "expert", "merge50", "t3", "t3_batch"]
    assert result.domains == ["clean", "gaussian_noise", "shot_noise", "impulse_noise"]
    assert result.method("generalist").errors["clean"] < 15
