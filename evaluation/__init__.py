"""Evaluation harness: the field's test-time adaptation protocols on real data, in-process or through the server.

``ttaserve eval`` is the command (docs/results.md has the measured runs); the same in Python — the embedded
Fashion-MNIST model on 300 test images with severity-5 Gaussian noise (this example runs in the test suite)::

    >>> from ttaserve.evaluation import DomainSpec, InProcessBackend, evaluate, load_fashion_mnist, resolve
    >>> from ttaserve.evaluation import strategy_methods
    >>> from ttaserve.evaluation.repository import FASHION_MODEL, FASHION_REPOSITORY
    >>> backend = InProcessBackend(FASHION_REPOSITORY, FASHION_MODEL)   # or GrpcBackend("host:8001", model)
    >>> spec = DomainSpec(("clean", "gaussian_noise"), severity=5, images_per_domain=300)
    >>> report = evaluate(backend, load_fashion_mnist(), resolve(["continual"]), strategy_methods(["none", "tbn"]),
    ...                   spec, cache_dir=cache_dir, progress=False)
    >>> continual = report.protocol("continual")
    >>> continual.method("tbn").errors["gaussian_noise"] < continual.method("none").errors["gaussian_noise"]
    True

Modules: ``datasets`` (CIFAR-10, Fashion-MNIST, image folders), ``corruptions`` and ``cache`` (seeded corrupted
copies on disk), ``streams`` and ``protocols`` (label orders, batching, resets), ``inprocess`` and ``remote``
(where methods run), ``harness`` (runs them), ``results``, ``report`` and ``plots`` (outputs), ``experts`` and
``repository`` (T3's fine-tuned experts and the model repository both backends read), ``cli``.
"""

from .datasets import ImageSet, load_cifar10, load_fashion_mnist, load_image_folder
from .harness import DomainSpec, evaluate, run_protocol
from .inprocess import InProcessBackend
from .methods import Method, strategy_methods
from .protocols import PROTOCOLS, Protocol, resolve
from .remote import GrpcBackend
from .results import MethodResult, ProtocolResult, Report

__all__ = [
    "PROTOCOLS",
    "DomainSpec",
    "GrpcBackend",
    "ImageSet",
    "InProcessBackend",
    "Method",
    "MethodResult",
    "Protocol",
    "ProtocolResult",
    "Report",
    "evaluate",
    "load_cifar10",
    "load_fashion_mnist",
    "load_image_folder",
    "resolve",
    "run_protocol",
    "strategy_methods",
]
