"""``rmt``: Robust Mean Teacher (Döbler, Marsden, Yang, CVPR 2023, "Robust Mean Teacher for Continual and Gradual
Test-Time Adaptation", arXiv:2211.13081)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .augment import rmt_augment
from .base import (
    AdapterState,
    SourceData,
    Step,
    Strategy,
    StrategyConfig,
    StrategyContext,
    share_weights_copy,
)
from .losses import multi_view_contrastive, prediction_stats, symmetric_cross_entropy
from .norm import replace_batchnorm
from .optim import GradientConfig, optimizer_step, zero_moments
from .registry import register
from .unmix_tns import NormSettings, forward_normalised, settings_components, thread_local_nets

#: Settings that change the warm-up's result; the warm-up cache is keyed by them.
_WARMUP_FIELDS = {
    "optimizer",
    "lr",
    "beta1",
    "beta2",
    "momentum",
    "nesterov",
    "norm",
    "unmix_components",
    "unmix_reference_batch",
    "unmix_temperature",
    "unmix_spread",
    "unmix_exact_init",
    "ema_momentum",
    "warmup_samples",
    "source_batch_size",
    "projection_dim",
}


class RMTConfig(GradientConfig, NormSettings):
    """RMT's CIFAR settings (Adam lr 1e-3 at batch 200; its ImageNet choice is SGD Nesterov, lr 0.01, batch 64).

    The source-dependent parts only run when the model brings source data: prototypes for the contrastive term,
    replay (``lambda_src`` > 0) and warm-up (``warmup_samples`` > 0; the paper uses 50,000 images).
    """

    nesterov: bool = Field(True, description="SGD Nesterov momentum (RMT's ImageNet setting)")
    ema_momentum: float = Field(0.999, ge=0.0, le=1.0, description="teacher EMA momentum")
    lambda_st: float = Field(1.0, ge=0.0, le=100.0, description="weight of the student-teacher SCE loss")
    lambda_cont: float = Field(1.0, ge=0.0, le=100.0, description="weight of the contrastive loss (needs source)")
    lambda_src: float = Field(1.0, ge=0.0, le=100.0, description="weight of source replay CE (needs source)")
    contrast_temperature: float = Field(0.1, gt=0.0, le=10.0, description="contrastive temperature")
    projection_dim: int = Field(128, ge=1, le=4096, description="width of the 2-layer projection MLP")
    warmup_samples: int = Field(50_000, ge=0, le=10_000_000, description="source images to warm up on (0 = off)")
    source_batch_size: int = Field(200, ge=1, le=4096, description="source batch size for warm-up and replay")
    input_mean: tuple[float, ...] | None = Field(
        None, description="input normalisation mean (default: the model's preprocessing, else ImageNet's)"
    )
    input_std: tuple[float, ...] | None = Field(
        None, description="input normalisation std (default: the model's preprocessing, else ImageNet's)"
    )


#: the input normalisation assumed when neither the settings nor the model say
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class RMTState(AdapterState):
    """Student and teacher parameters (all of the model's, by name), the projection MLP, the optimizer moments
    (keys ``student.<name>`` / ``projector.<name>``), the augmentation generator's state and, with
    ``norm='unmix_tns'``, the student's and teacher's UnMix-TNS components."""

    student: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    projector: dict[str, torch.Tensor] = field(default_factory=dict)
    first: dict[str, torch.Tensor] = field(default_factory=dict)
    second: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_steps: int = 0
    rng: torch.Tensor = field(default_factory=lambda: torch.Generator().get_state())
    student_means: dict[str, torch.Tensor] = field(default_factory=dict)
    student_variances: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_means: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_variances: dict[str, torch.Tensor] = field(default_factory=dict)


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier head: the last ``nn.Linear`` in module order. Its input is the feature RMT contrasts."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("rmt needs a model whose classifier is an nn.Linear")
    return linears[-1]


def _capture_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    module.captured = args[0]


def _featured_copy(model: nn.Module, layer: type[nn.Module]) -> nn.Module:
    """A weight-sharing copy with ``layer`` normalisation whose head records its input on every forward."""
    net = replace_batchnorm(model, layer)
    last_linear(net).register_forward_pre_hook(_capture_input)
    return net


def _trainable(student: dict[str, torch.Tensor], projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Student and projector parameters under the optimizer's key names."""
    return {**{f"student.{k}": v for k, v in student.items()}, **{f"projector.{k}": v for k, v in projector.items()}}


def project(projector: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The 2-layer projection MLP (Linear, ReLU, Linear), L2-normalised output."""
    hidden = F.relu(F.linear(features, projector["0.weight"], projector["0.bias"]))
    return F.normalize(F.linear(hidden, projector["2.weight"], projector["2.bias"]), dim=-1)


@register
class RMT(Strategy):
    """Robust Mean Teacher: a student trained on symmetric cross-entropy to an EMA teacher, plus a contrastive
    term that pulls features toward source class prototypes.

    Per batch (one optimizer step on *all* student parameters and the projector): student logits on x and on one
    random augmentation T(x), teacher logits on x; L = λ_st·mean[½SCE(z, z_t) + ½SCE(z_a, z_t)]
    + λ_cont·contrastive([prototype, x, T(x)] views) + λ_src·CE(source batch); then the teacher follows the
    student by EMA. Every BatchNorm2d uses batch statistics (or UnMix-TNS). The prediction is z + z_t from the
    forwards before the update, as the reference returns it.

    Source data (``StrategyContext.source``) is optional: prototypes (mean source feature per class, computed once
    with the source model and its source BN statistics), replay, and a warm-up that ramps the learning rate
    linearly over ``warmup_samples`` source images with the SCE loss only. The warm-up runs once per setting and
    is cached here, then every new session starts from its result. Without source data RMT runs source-free and
    without the contrastive term; :meth:`variant` and the ``source_free``/``contrastive`` stats say what ran.
    Known failure: it collapses on label-sorted streams and degrades at batch size 1.
    """

    name = "rmt"
    config_cls = RMTConfig
    stateful = True
    state_cls = RMTState
    uses_gradients = True
    requires = ("batchnorm",)

    def __init__(self, model: nn.Module, context: StrategyContext | None = None) -> None:
        super().__init__(model, context)
        self._nets = thread_local_nets(model, _featured_copy)
        self._source = self.context.source
        self._prototypes = self._source_prototypes(model) if self._source is not None else None
        self._warm: dict[str, RMTState] = {}
        self._warm_lock = threading.Lock()

    def variant(self, config: RMTConfig) -> str:  # type: ignore[override]
        """Which parts of RMT run with this config and this model's source data, e.g. ``sce+contrastive``."""
        parts = ["sce"]
        if self._source is not None:
            parts += [
                part
                for part, on in (
                    ("contrastive", config.lambda_cont > 0),
                    ("replay", config.lambda_src > 0),
                    ("warmup", config.warmup_samples > 0),
                )
                if on
            ]
        return "+".join(parts)

    def init_state(self, config: StrategyConfig) -> RMTState:
        assert isinstance(config, RMTConfig)
        if self._source is None or config.warmup_samples == 0:
            return self._fresh_state(config)
        key = config.model_dump_json(include=_WARMUP_FIELDS)
        with self._warm_lock:
            if key not in self._warm:
                self._warm[key] = self._warm_up(self._fresh_state(config), config, self._source)
            warm = self._warm[key]
        return warm.clone()  # type: ignore[return-value]

    def step(self, state: AdapterState, x: torch.Tensor, config: StrategyConfig) -> Step:
        assert isinstance(state, RMTState) and isinstance(config, RMTConfig)
        net = self._nets[config.norm].get()
        head = last_linear(net)
        generator = torch.Generator().set_state(state.rng)
        mean = config.input_mean or self.context.input_mean or IMAGENET_MEAN
        std = config.input_std or self.context.input_std or IMAGENET_STD
        x_aug = rmt_augment(x, generator, mean, std)
        contrastive = self._prototypes is not None and config.lambda_cont > 0
        replay = self._source is not None and config.lambda_src > 0
        source_batch = self._source_batch(generator, config) if replay else None

        with torch.no_grad():
            z_t, t_means, t_vars = forward_normalised(
                net, state.teacher, x, state.teacher_means, state.teacher_variances, config
            )
        student = {k: v.detach().requires_grad_() for k, v in state.student.items()}
        projector = {k: v.detach().requires_grad_() for k, v in state.projector.items()} if contrastive else {}
        stats: dict[str, float] = {}
        with torch.enable_grad():
            z, s_means, s_vars = forward_normalised(
                net, student, x, state.student_means, state.student_variances, config
            )
            features = head.captured
            # The augmented and source views use the student's components without moving them.
            z_a, _, _ = forward_normalised(net, student, x_aug, s_means, s_vars, config, update=False)
            features_aug = head.captured
            loss_st = (0.5 * symmetric_cross_entropy(z, z_t) + 0.5 * symmetric_cross_entropy(z_a, z_t)).mean()
            loss = config.lambda_st * loss_st
            stats["loss_st"] = loss_st.item()
            if contrastive:
                loss_cont = self._contrastive_loss(projector, features, features_aug, config)
                loss = loss + config.lambda_cont * loss_cont
                stats["loss_cont"] = loss_cont.item()
            if source_batch is not None:
                z_src, _, _ = forward_normalised(net, student, source_batch[0], s_means, s_vars, config, update=False)
                loss_src = F.cross_entropy(z_src, source_batch[1])
                loss = loss + config.lambda_src * loss_src
                stats["loss_src"] = loss_src.item()
            trained = _trainable(student, projector)
            grads = torch.autograd.grad(loss, list(trained.values()))
        new_state = self._apply_update(
            state, dict(zip(trained, grads, strict=True)), config, config.lr, s_means, s_vars, t_means, t_vars
        )
        new_state.steps = state.steps + 1
        new_state.rng = generator.get_state()
        logits = (z + z_t).detach()
        stats.update(prediction_stats(logits))
        stats.update(
            loss=loss.item(),
            source_free=float(self._source is None or not (replay or config.warmup_samples > 0)),
            contrastive=float(contrastive),
        )
        return Step(logits=logits, state=new_state, stats=stats)

    def _fresh_state(self, config: RMTConfig) -> RMTState:
        net = self._nets[config.norm].get()
        student = {k: v.detach().clone() for k, v in net.named_parameters()}
        generator = torch.Generator().manual_seed(self.context.seed)
        feature_dim = last_linear(net).in_features
        projector: dict[str, torch.Tensor] = {}
        width = config.projection_dim
        for index, (fan_in, fan_out) in ((0, (feature_dim, width)), (2, (width, width))):
            bound = 1 / math.sqrt(fan_in)
            projector[f"{index}.weight"] = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
            projector[f"{index}.bias"] = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
        projector = {k: v.to(self.context.device) for k, v in projector.items()}
        first, second = zero_moments(_trainable(student, projector), config)
        means, variances = settings_components(net, config, self.context.seed, self.context.device)
        return RMTState(
            student=student,
            teacher={k: v.clone() for k, v in student.items()},
            projector=projector,
            first=first,
            second=second,
            rng=generator.get_state(),
            student_means=means,
            student_variances=variances,
            teacher_means={k: v.clone() for k, v in means.items()},
            teacher_variances={k: v.clone() for k, v in variances.items()},
        )

    def _apply_update(
        self,
        state: RMTState,
        grads: dict[str, torch.Tensor],
        config: RMTConfig,
        lr: float,
        s_means: dict[str, torch.Tensor],
        s_vars: dict[str, torch.Tensor],
        t_means: dict[str, torch.Tensor],
        t_vars: dict[str, torch.Tensor],
    ) -> RMTState:
        """Optimizer step on the parameters that got gradients, then the teacher's EMA toward the new student."""
        current = _trainable(state.student, state.projector)
        steps = state.optimizer_steps + 1
        updated, first, second = optimizer_step(
            {k: current[k] for k in grads},
            grads,
            {k: state.first[k] for k in grads},
            {k: state.second[k] for k in grads if k in state.second},
            steps,
            config,
            lr=lr,
        )
        student = {k: updated[f"student.{k}"] for k in state.student}
        projector = {k: updated.get(f"projector.{k}", v) for k, v in state.projector.items()}
        m = config.ema_momentum
        with torch.no_grad():
            teacher = {k: m * v + (1 - m) * student[k] for k, v in state.teacher.items()}
        return RMTState(
            steps=state.steps,
            student=student,
            teacher=teacher,
            projector=projector,
            first={**state.first, **first},
            second={**state.second, **second},
            optimizer_steps=steps,
            rng=state.rng,
            student_means=s_means,
            student_variances=s_vars,
            teacher_means=t_means,
            teacher_variances=t_vars,
        )

    def _contrastive_loss(
        self,
        projector: dict[str, torch.Tensor],
        features: torch.Tensor,
        features_aug: torch.Tensor,
        config: RMTConfig,
    ) -> torch.Tensor:
        """Views [nearest source prototype, x, T(x)] of each sample are positives of one another."""
        assert self._prototypes is not None
        with torch.no_grad():
            similarity = F.cosine_similarity(features[:, None, :], self._prototypes[None], dim=-1)
            nearest = self._prototypes[similarity.argmax(dim=1)]
        views = torch.stack([project(projector, v) for v in (nearest, features, features_aug)], dim=1)
        return multi_view_contrastive(views, config.contrast_temperature)

    def _source_batch(self, generator: torch.Generator, config: RMTConfig) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._source is not None
        index = torch.randint(len(self._source.labels), (config.source_batch_size,), generator=generator)
        device = self.context.device
        return self._source.images[index].to(device), self._source.labels[index].to(device)

    def _source_prototypes(self, model: nn.Module) -> torch.Tensor:
        """Mean source feature per class present, with the source model as served (its source BN statistics, so
        a class-sorted source set gives the same prototypes as a shuffled one)."""
        assert self._source is not None
        net = share_weights_copy(model).eval()
        head = last_linear(net)
        head.register_forward_pre_hook(_capture_input)
        features = []
        with torch.no_grad():
            for images in self._source.images.split(256):
                net(images.to(self.context.device))
                features.append(head.captured)
        feats = torch.cat(features)
        labels = self._source.labels.to(feats.device)
        return torch.stack([feats[labels == c].mean(dim=0) for c in labels.unique()])

    def _warm_up(self, state: RMTState, config: RMTConfig, source: SourceData) -> RMTState:
        """SCE-only training on random source batches, the learning rate ramped linearly up to ``lr``."""
        net = self._nets[config.norm].get()
        generator = torch.Generator().manual_seed(self.context.seed + 1)
        steps = math.ceil(config.warmup_samples / config.source_batch_size)
        for i in range(steps):
            self.check_open()
            index = torch.randint(len(source.labels), (config.source_batch_size,), generator=generator)
            images = source.images[index].to(self.context.device)
            with torch.no_grad():
                z_t, t_means, t_vars = forward_normalised(
                    net, state.teacher, images, state.teacher_means, state.teacher_variances, config
                )
            student = {k: v.detach().requires_grad_() for k, v in state.student.items()}
            with torch.enable_grad():
                z, s_means, s_vars = forward_normalised(
                    net, student, images, state.student_means, state.student_variances, config
                )
                loss = symmetric_cross_entropy(z, z_t).mean()
                grads = torch.autograd.grad(loss, list(student.values()))
            grads_by_name = dict(zip(_trainable(student, {}), grads, strict=True))
            lr = config.lr * (i + 1) / steps
            state = self._apply_update(state, grads_by_name, config, lr, s_means, s_vars, t_means, t_vars)
        return state
