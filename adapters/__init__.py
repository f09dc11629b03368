"""Test-time adaptation strategies behind one interface (plain PyTorch; no gRPC, no server imports)."""

from . import source, t3  # noqa: F401  (registers the strategies)
from .base import AdapterState, SourceData, Step, Strategy, StrategyConfig, StrategyContext
from .registry import Adapter, get_strategy_class, register, strategy_names

__all__ = [
    "Adapter",
    "AdapterState",
    "SourceData",
    "Step",
    "Strategy",
    "StrategyConfig",
    "StrategyContext",
    "get_strategy_class",
    "register",
    "strategy_names",
]
