"""Export a PyTorch classifier to ONNX and prove the export computes the same logits.

An export is only worth serving if it agrees with the module it came from, so every export here is followed by a
parity check on ONNX Runtime (CPU, so the check does not depend on the serving device): random inputs plus, when
given, a real sample batch. The ONNX graph takes what every engine takes, a normalised float32 (N, C, H, W) batch
with a dynamic N, and returns the logits.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .engines.onnx_engine import OnnxEngine

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
#: largest allowed max |onnx - torch| relative to the largest |torch logit| (floored at 1)
DEFAULT_RTOL = 1e-4


class ParityError(RuntimeError):
    """The ONNX export's logits differ from the PyTorch module's beyond the tolerance."""


@dataclass(frozen=True)
class ParityCheck:
    """One batch compared: how far apart the logits are and whether the predicted classes agree."""

    name: str
    batch: int
    max_abs_diff: float
    relative_diff: float
    argmax_agreement: float
    #: argmax disagreements where torch's top-2 margin exceeds twice the logit difference (i.e. not a tie)
    real_disagreements: int


@dataclass(frozen=True)
class ParityReport:
    checks: tuple[ParityCheck, ...]
    rtol: float
    opset: int
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return all(c.relative_diff <= self.rtol and c.real_disagreements == 0 for c in self.checks)

    def summary(self) -> str:
        lines = [f"ONNX export{f' {self.path}' if self.path else ''} (opset {self.opset}), tolerance {self.rtol:g}"]
        for c in self.checks:
            lines.append(
                f"  {c.name:<8} batch {c.batch:>4}  max|diff| {c.max_abs_diff:.3e}  relative {c.relative_diff:.3e}  "
                f"argmax agreement {c.argmax_agreement:.2%}"
            )
        lines.append("  parity: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise ParityError(self.summary())


def export_onnx_bytes(module: nn.Module, input_shape: tuple[int, int, int], opset: int = DEFAULT_OPSET) -> bytes:
    """Trace ``module`` (a CPU copy, so the caller's module is untouched) to ONNX with a dynamic batch axis."""
    cpu_module = copy.deepcopy(module).cpu().eval()
    dummy = torch.zeros((2, *input_shape), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates the TorchScript-based exporter; it needs no onnxscript, which is why we use it.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Option-A shortcuts slice with step 2, which the constant folder skips; the graph is still correct.
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(
            cpu_module,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _compare(name: str, reference: np.ndarray, candidate: np.ndarray) -> ParityCheck:
    diff = float(np.max(np.abs(reference - candidate)))
    scale = max(float(np.max(np.abs(reference))), 1.0)
    agree = reference.argmax(1) == candidate.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    return ParityCheck(
        name=name,
        batch=len(reference),
        max_abs_diff=diff,
        relative_diff=diff / scale,
        argmax_agreement=float(agree.mean()),
        real_disagreements=int(np.sum(~agree & (margins > 2 * diff))),
    )


@torch.inference_mode()
def check_parity(
    module: nn.Module,
    onnx_model: bytes | Path,
    input_shape: tuple[int, int, int],
    *,
    sample: np.ndarray | None = None,
    random_batch: int = 16,
    rtol: float = DEFAULT_RTOL,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ParityReport:
    """Run ``module`` (on the CPU) and the ONNX model on ORT's CPU provider and compare their logits.

    ``sample`` is a normalised float32 (N, C, H, W) batch of real inputs; random inputs are standard normal,
    which is about the range normalised images have.
    """
    cpu_module = copy.deepcopy(module).cpu().eval()
    engine = OnnxEngine(onnx_model, device="cpu")
    batches = {"random": np.random.default_rng(seed).standard_normal((random_batch, *input_shape), dtype=np.float32)}
    if sample is not None:
        batches["sample"] = np.ascontiguousarray(sample, dtype=np.float32)
    checks = []
    for name, x in batches.items():
        reference = cpu_module(torch.from_numpy(x)).float().numpy()
        checks.append(_compare(name, reference, engine.infer(x)))
    engine.close()
    return ParityReport(tuple(checks), rtol, opset, onnx_model if isinstance(onnx_model, Path) else None)


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    path: Path,
    opset: int = DEFAULT_OPSET,
    *,
    sample: np.ndarray | None = None,
    rtol: float = DEFAULT_RTOL,
) -> ParityReport:
    """Write ``module`` as ONNX to ``path`` and return the parity report (check ``report.ok``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export_onnx_bytes(module, input_shape, opset))
    return check_parity(module, path, input_shape, sample=sample, rtol=rtol, opset=opset)


def export_for_serving(module: nn.Module, input_shape: tuple[int, int, int], opset: int = DEFAULT_OPSET) -> bytes:
    """In-memory export for ``onnx_source_path: true`` models; raises ``ParityError`` rather than serve a bad graph."""
    data = export_onnx_bytes(module, input_shape, opset)
    check_parity(module, data, input_shape, opset=opset).raise_for_failure()
    return data
