"""Losses and per-batch statistics shared by the strategies (entropy, symmetric cross-entropy, contrastive)."""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` in nats, shape (N,)."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def prediction_stats(logits: torch.Tensor) -> dict[str, float]:
    """What every step reports about its predictions: mean entropy (nats) and mean top-1 confidence."""
    with torch.no_grad():
        logits = logits.float()
        # one transfer to the host (on a GPU each is a synchronisation)
        mean_entropy, confidence = torch.stack(
            (entropy(logits).mean(), logits.softmax(dim=1).amax(dim=1).mean())
        ).tolist()
        return {"entropy": mean_entropy, "confidence": confidence}


def symmetric_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RMT's SCE per sample: −½ Σ softmax(t)·log softmax(a) − ½ Σ softmax(a)·log softmax(t), shape (N,).

    Gradients flow into both arguments as given; callers pass teacher logits computed without gradient.
    """
    a_log, t_log = student.log_softmax(dim=1), teacher.log_softmax(dim=1)
    return -0.5 * (t_log.exp() * a_log).sum(dim=1) - 0.5 * (a_log.exp() * t_log).sum(dim=1)


def multi_view_contrastive(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised-contrastive loss (Khosla et al. 2020) where the only positives of a view are the other views of
    the same sample.

    ``embeddings`` is (N, V, D), L2-normalised; every one of the N·V views is an anchor, all other views in the
    batch are its contrast set. Returns the mean over anchors of −mean over positives of the log-probability.
    """
    n, v, _ = embeddings.shape
    flat = embeddings.reshape(n * v, -1)
    logits = flat @ flat.T / temperature
    eye = torch.eye(n * v, dtype=torch.bool, device=flat.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    sample = torch.arange(n, device=flat.device).repeat_interleave(v)
    positives = (sample[:, None] == sample[None, :]) & ~eye
    return -(log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1)).mean()
