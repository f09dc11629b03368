"""Test-time adaptation strategies behind one interface (plain PyTorch; no gRPC, no server imports).

Adapting any BatchNorm classifier to a stream, as a library (this example runs in the test suite)::

    >>> import torch
    >>> from torch import nn
    >>> from ttaserve.adapters import Adapter
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    >>> adapter = Adapter("tent", model, lr=1e-3, norm="unmix_tns")  # TENT on UnMix-TNS normalisation
    >>> for batch in torch.randn(3, 16, 3, 32, 32):  # a stream of three batches
    ...     logits = adapter(batch)                  # adapt on the batch, predict it
    >>> logits.shape, adapter.state.steps, sorted(adapter.last_stats)
    (torch.Size([16, 10]), 3, ['confidence', 'entropy', 'loss'])
    >>> snapshot = adapter.state.to_dict()  # plain tensors: torch.save it, restore with from_dict
    >>> adapter.reset()                     # back to the source model's state
"""

from . import alpha_bn, rmt, source, t3, tbn, tent, unmix_tns  # noqa: F401  (registers the strategies)
from .base import AdapterState, SourceData, Step, Strategy, StrategyClosed, StrategyConfig, StrategyContext
from .registry import Adapter, get_strategy_class, register, strategy_names

__all__ = [
    "Adapter",
    "AdapterState",
    "SourceData",
    "Step",
    "Strategy",
    "StrategyClosed",
    "StrategyConfig",
    "StrategyContext",
    "get_strategy_class",
    "register",
    "strategy_names",
]
