"""Meta-transfer learning (Sun et al., CVPR 2019): meta-learn Φ (SS) and the FC head's initialisation θ.

Per task the encoder (an :class:`~mtl_plugin.ss.SSAdapter` around the pretrained
backbone) runs once on support and query images together. The inner loop adapts
only the linear head, functionally (plain tensors ``W, b`` and
``torch.autograd.grad``), on those features: the backbone never runs again and
no frozen weight is copied. The outer loop (Adam) updates the encoder's trainable
parameters (Φ) at ``encoder_lr`` and θ at ``head_lr``, second order unless
``first_order``. :func:`meta_train` is the long-run loop: optional hard-task
meta-batch, validation, best/last checkpoints, metrics CSV and curve, resume.

A run folder is continued only with ``resume`` and replaced only with ``overwrite``; on
resume the learning rates of the config replace the saved ones, other settings that would
change the experiment are refused unless ``override``. Every outer step is checked for
divergence (see :meth:`MetaTransferLearner.meta_train_step`): a diverging run stops with
:class:`~mtl_plugin.errors.NonFiniteLossError` naming the likely learning rate, and its
checkpoints stay as they were.

The head's starting point (``head_init``) is by default built from each task's
support set, so that it does not depend on the arbitrary order of a task's
labels (see :class:`MetaTrainConfig`); ``"kaiming"`` is the official code's
per-label-position θ, kept for comparison.

Example::

    learner = MetaTransferLearner(SSAdapter(pretrained_backbone), ways=5)
    for iteration in range(1000):                      # a learn2learn Taskset works as is
        result = learner.meta_train_step([taskset.sample() for _ in range(2)])
    head = learner.adapt(support_x, support_y)         # test time: adapt θ on a support set
    logits = head(learner.features(query_x))
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

import learn2learn as l2l
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.data.benchmark import benchmark_identity
from mtl_plugin.errors import DataError, UsageError, read_checkpoint
from mtl_plugin.evaluation import EvaluationConfig, evaluate
from mtl_plugin.io import atomic_save_figure
from mtl_plugin.progress import progress_bar
from mtl_plugin.prototypes import class_prototypes
from mtl_plugin.run_log import (
    DIVERGENCE_FACTOR,
    NonFiniteLossError,
    RunLog,
    all_finite,
    capture_rng_state,
    check_same_run,
    fast_forward,
    previous_run,
    restore_rng_state,
    save_checkpoint,
)
from mtl_plugin.tasks import KShots, RemapLabels, build_taskset, check_task_shape, split_support_query

__all__ = [
    "HEAD_INITS",
    "AdaptedHead",
    "MetaStepResult",
    "MetaTrainConfig",
    "MetaTrainResult",
    "MetaTransferLearner",
    "load_learner_state",
    "meta_train",
    "plot_meta_curves",
]

CHECKPOINT_KIND = "meta-transfer"
HEAD_INITS = ("prototype", "kaiming")
# Gradient descent on the inner loop's convex loss lowers the support loss at any stable
# inner_lr; ending ten times above where it started (or above chance level) is divergence.
INNER_DIVERGENCE_FACTOR = 10.0
# Adam moves each weight by about its lr per step: a step that multiplies the norm of Φ or θ
# by ten comes from an lr far above the weights' own scale, not from learning.
STEP_GROWTH_LIMIT = 10.0
# What a resumed run may change without override: lower lrs rescue a diverged run, and neither
# the step schedule nor the tasks depend on the total number of iterations.
_MAY_CHANGE_ON_RESUME = ("inner_lr", "encoder_lr", "head_lr", "iterations", "checkpoint_every")
_LEARNING_RATES = ("inner_lr", "encoder_lr", "head_lr")


@dataclass
class MetaTrainConfig:
    """Meta-training hyper-parameters; the defaults follow the paper and its official code.

    * ``inner_lr`` 0.01, ``encoder_lr`` 1e-4 (Φ), ``head_lr`` 1e-3 (θ), Adam, both
      halved every 1,000 iterations (``lr_step``, ``lr_gamma``), 10,000 iterations:
      the official code.
    * ``inner_steps`` 20 while meta-training and ``test_inner_steps`` 100 when
      adapting at validation/test time: the paper-era (TensorFlow) official code
      (``train_base_epoch_num=20``, ``test_base_epoch_num=100``); the later PyTorch
      port used 100 for both, which costs 5x the inner loop for the same result.
    * ``first_order=False``: the paper's meta-gradient flows through the inner loop
      (the PyTorch port is first order; ``first_order=True`` reproduces it).
    * ``meta_batch`` 2 normal tasks per iteration, and with ``hard_tasks`` 2
      (``hard_meta_batch``) hard tasks after them: Algorithm 2 with k = k'.
      ``hard_history_decay`` 0.9 keeps failure classes across meta-batches so
      that a hard N-way task is made of N failure classes
      (:class:`~mtl_plugin.hard_tasks.ClassAccuracyTracker`).
    * validation on 600 val tasks every 100 iterations keeps the best checkpoint.

    Raises ``UsageError`` (a ``ValueError``) for a value out of range or an unknown name.

    ``head_init`` departs from the official code on purpose. Its θ = (W, b) is
    one Kaiming-initialised row per label *position*, but a task's labels are
    a random permutation of its classes, so the row that label 2 meets is
    unrelated to the class it stands for: the class-specific part of θ is noise
    and only its class-symmetric part can be meta-learned (0 inner steps give
    chance accuracy), and that part cancels in the softmax. ``"prototype"`` (the
    default) starts each task's head from its support set's class means c_k in
    the Proto-MAML form W_k = 2·(d⊙c_k)/s², b_k = -(d⊙c_k)·c_k/s²: before any
    inner step its logits are -Σ_i d_i (x_i - c_ki)²/s² up to a per-query
    constant, i.e. nearest-class-mean whatever the label order. s², the support
    features' mean squared distance to their mean, fixes the logits' scale per
    task: without it the raw distances of well-pretrained features gave query
    losses near 17 and meta-training made Φ worse. θ is the label-independent
    per-feature weighting d (initialised to 1, meta-learned at ``head_lr``; it
    also sets the temperature), and the meta-gradient reaches Φ through the
    class means as well as through the query features. ``"kaiming"`` is the
    official code's θ.

    Example::

        config = MetaTrainConfig(shots=5, hard_tasks=True, iterations=2000)
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    inner_steps: int = 20
    test_inner_steps: int = 100
    inner_lr: float = 0.01
    encoder_lr: float = 1e-4
    head_lr: float = 1e-3
    first_order: bool = False
    iterations: int = 10_000
    meta_batch: int = 2
    lr_step: int = 1_000
    lr_gamma: float = 0.5
    hard_tasks: bool = False
    hard_meta_batch: int = 2
    hard_task_mode: str = "resample"
    hard_history_decay: Optional[float] = 0.9
    head_init: str = "prototype"
    val_every: int = 100
    val_tasks: int = 600
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self):
        positive = ("ways", "shots", "queries", "iterations", "meta_batch", "lr_step", "val_every",
                    "val_tasks", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("inner_steps", "test_inner_steps", "hard_meta_batch"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("inner_lr", "encoder_lr", "head_lr", "lr_gamma"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name}={getattr(self, name)} must be > 0")
        if self.hard_task_mode not in ("resample", "reuse"):
            raise UsageError(f"hard_task_mode={self.hard_task_mode!r} must be 'resample' or 'reuse'")
        if self.hard_history_decay is not None and not 0.0 <= self.hard_history_decay < 1.0:
            raise UsageError(
                f"hard_history_decay={self.hard_history_decay} must be in [0, 1), or None to keep no history"
            )
        if self.head_init not in HEAD_INITS:
            raise UsageError(f"head_init={self.head_init!r} is unknown; use one of {HEAD_INITS}")


@dataclass
class AdaptedHead:
    """The linear head after adaptation to one support set: ``logits = features @ W.T + b``.

    Example::

        head = learner.adapt(support_x, support_y)
        logits = head(learner.features(query_x))
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


@dataclass
class MetaStepResult:
    """Mean query loss and accuracy (%) of one meta-batch, its number of tasks, and each task's accuracy.

    ``task_accuracies[i]`` is the query accuracy (%) of the i-th task and
    ``hard[i]`` whether it was a hard task (a task with a true ``hard`` attribute).

    Example::

        result = learner.meta_train_step(tasks)
        print(result.loss, result.accuracy, result.normal_accuracy, result.hard_accuracy)
    """

    loss: float
    accuracy: float
    tasks: int
    task_accuracies: List[float] = field(default_factory=list)
    hard: List[bool] = field(default_factory=list)

    @property
    def normal_accuracy(self) -> float:
        """Mean query accuracy (%) of the normal tasks; NaN if there were none."""
        return _mean([a for a, hard in zip(self.task_accuracies, self.hard) if not hard])

    @property
    def hard_accuracy(self) -> float:
        """Mean query accuracy (%) of the hard tasks; NaN if there were none."""
        return _mean([a for a, hard in zip(self.task_accuracies, self.hard) if hard])


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _feature_dim(encoder: nn.Module) -> Optional[int]:
    for module in (encoder, getattr(encoder, "backbone", None)):
        if module is not None and isinstance(getattr(module, "feature_dim", None), int):
            return module.feature_dim
    return None


def _support_query(task: Any, shots: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept a ``SampledTask``, a learn2learn ``(data, labels)`` task or ``(sx, sy, qx, qy)``."""
    if hasattr(task, "data") and hasattr(task, "labels"):
        task = (task.data, task.labels)
    if len(task) == 4:
        return tuple(task)
    if len(task) == 2:
        (sx, sy), (qx, qy) = split_support_query(task[0], task[1], shots)
        return sx, sy, qx, qy
    raise ValueError(
        f"a task must be (data, labels), (support_x, support_y, query_x, query_y) or a SampledTask, "
        f"not a sequence of {len(task)}"
    )


class MetaTransferLearner(nn.Module):
    """An encoder whose trainable parameters (Φ) are meta-learned with a meta-learned linear head θ.

    ``encoder`` is usually ``SSAdapter(pretrained_backbone)`` (only Φ trainable);
    a plain backbone gives the "train from scratch" ablation (all weights learned).
    θ is ``head_metric`` (d) with ``config.head_init="prototype"``, from which each
    task's head starts at its support set's class means (any number of classes),
    or ``head_weight`` and ``head_bias`` with ``"kaiming"`` (a ``ways``-way head).
    The learner owns its Adam optimiser and step schedule (``optimizer``,
    ``scheduler``) so that :meth:`meta_train_step` is one call in any loop; use
    :meth:`task_loss` with ``meta_parameters()`` to drive your own optimiser.

    Example::

        learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTrainConfig())
        tasks = l2l.data.Taskset(...)                   # or mtl_plugin.tasks.build_taskset
        result = learner.meta_train_step([tasks.sample(), tasks.sample()])
        logits = learner.predict(support_x, support_y, query_x, ways=5)
    """

    def __init__(
        self,
        encoder: nn.Module,
        ways: int,
        config: Optional[MetaTrainConfig] = None,
        feature_dim: Optional[int] = None,
    ):
        super().__init__()
        self.config = config or MetaTrainConfig(ways=ways)
        feature_dim = feature_dim or _feature_dim(encoder)
        if feature_dim is None:
            raise ValueError(
                f"cannot tell the feature width of {type(encoder).__name__}: give it an int attribute "
                f"feature_dim or pass feature_dim="
            )
        self.encoder = encoder
        self.ways = ways
        if self.config.head_init == "prototype":
            self.head_metric = nn.Parameter(torch.ones(feature_dim))
        else:
            generator = torch.Generator().manual_seed(self.config.seed)
            weight = torch.empty(ways, feature_dim)
            # The official code's head initialisation: Kaiming-normal weights, zero bias.
            nn.init.kaiming_normal_(weight, generator=generator)
            self.head_weight = nn.Parameter(weight)
            self.head_bias = nn.Parameter(torch.zeros(ways))
        groups = []
        encoder_parameters = [p for p in encoder.parameters() if p.requires_grad]
        if encoder_parameters:
            groups.append({"params": encoder_parameters, "lr": self.config.encoder_lr})
        groups.append({"params": self.head_parameters(), "lr": self.config.head_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.apply_learning_rates()

    def _lr_names(self) -> List[str]:
        # The optimiser's groups: Φ (when the encoder has trainable parameters), then θ.
        return ["encoder_lr"] * (len(self.optimizer.param_groups) - 1) + ["head_lr"]

    def apply_learning_rates(self, steps: int = 0) -> None:
        """Put ``config.encoder_lr`` and ``config.head_lr`` into the optimiser and rebuild its step schedule.

        The schedule is brought to ``steps`` outer steps, so that a resumed run continues
        under the config's lrs from where it was; with the saved lrs this gives the very lrs
        of an uninterrupted run.

        Args:
            steps: the outer steps already taken (the saved scheduler's ``last_epoch``).

        Example::

            learner.optimizer.load_state_dict(state["optimizer"])
            learner.apply_learning_rates(state["scheduler"]["last_epoch"])
        """
        for group, name in zip(self.optimizer.param_groups, self._lr_names()):
            group.update(lr=getattr(self.config, name), initial_lr=getattr(self.config, name))
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=self.config.lr_step, gamma=self.config.lr_gamma
        )
        fast_forward(self.scheduler, steps)

    @property
    def device(self) -> torch.device:
        return self.head_parameters()[0].device

    def head_parameters(self) -> List[nn.Parameter]:
        """θ: ``[head_metric]`` (prototype init) or ``[head_weight, head_bias]`` (Kaiming init)."""
        if self.config.head_init == "prototype":
            return [self.head_metric]
        return [self.head_weight, self.head_bias]

    def meta_parameters(self) -> List[nn.Parameter]:
        """What the outer loop learns: the encoder's trainable parameters, then θ."""
        return [p for p in self.encoder.parameters() if p.requires_grad] + self.head_parameters()

    def initial_head(self, features: torch.Tensor, labels: torch.Tensor, ways: Optional[int] = None) -> AdaptedHead:
        """The head a task's inner loop starts from, on its support ``features`` and ``labels``.

        Args:
            features: support features, shape (n, feature_dim).
            labels: their task labels, 0..ways-1.
            ways: the task's number of classes; default: the head's for Kaiming,
                ``labels.max() + 1`` for the prototype init.

        Returns:
            With the prototype init, W_k = 2·(d⊙c_k)/s², b_k = -(d⊙c_k)·c_k/s² from
            the class means c_k and the support features' mean squared distance s²
            to their mean (a constant of the task), differentiable with respect to
            d and the features; with Kaiming, θ itself.

        Raises:
            ValueError: if a label is out of range, or a class has no support sample.

        Example::

            head = learner.initial_head(learner.features(support_x), support_y)
            predictions = head(learner.features(query_x)).argmax(1)  # nearest class mean
        """
        labels = labels.to(self.device).long()
        if self.config.head_init == "kaiming":
            ways = self.ways if ways is None else ways
            if ways != self.ways:
                raise ValueError(f"this learner's head is {self.ways}-way; the task is {ways}-way")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.ways):
                raise ValueError(f"support labels must be in 0..{self.ways - 1} for a {self.ways}-way head")
            return AdaptedHead(self.head_weight, self.head_bias)
        if not labels.numel():
            raise ValueError("the support set is empty: the prototype head init needs a sample of every class")
        ways = int(labels.max()) + 1 if ways is None else ways
        if labels.min() < 0:
            raise ValueError(f"support labels must be in 0..{ways - 1}, not negative")
        means = class_prototypes(features, labels, ways)
        # Raw squared distances grow with the features' magnitude: on a well-pretrained Conv4 the first
        # query losses were near 17, and their gradients wrecked Φ while d was still shrinking. Dividing
        # by the support set's spread (label-free, a constant of the task) starts every task at logit
        # margins of a few units, whatever the features' scale.
        spread = (features - features.mean(dim=0)).pow(2).sum(dim=1).mean().detach().clamp_min(1e-8)
        weighted = self.head_metric * means / spread
        return AdaptedHead(2 * weighted, -(weighted * means).sum(dim=1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's flat features of a batch of images."""
        return self.encoder(x.to(self.device))

    def adapt_features(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        steps: Optional[int] = None,
        first_order: Optional[bool] = None,
        ways: Optional[int] = None,
    ) -> AdaptedHead:
        """Adapt the head from :meth:`initial_head` on support ``features`` by ``steps`` steps at ``inner_lr``.

        With gradients enabled the result stays differentiable with respect to θ
        and to the features: through the class means of the prototype init, and
        (second order) through the inner-loop gradients. Under ``torch.no_grad()``
        it is a plain, detached fine-tuning of the head.

        Example::

            head = learner.adapt_features(learner.features(support_x), support_y)
        """
        steps = self.config.inner_steps if steps is None else steps
        first_order = self.config.first_order if first_order is None else first_order
        labels = labels.to(self.device).long()
        if not torch.is_grad_enabled():
            with torch.enable_grad():
                features = features.detach()
                start = self.initial_head(features, labels, ways)
                head = self._inner_loop(start, features, labels, steps, differentiable=False, first_order=True)
            return AdaptedHead(head.weight.detach(), head.bias.detach())
        start = self.initial_head(features, labels, ways)
        if first_order:
            # First order drops the inner-loop gradients' path to Φ; the start keeps its own.
            features = features.detach()
        return self._inner_loop(start, features, labels, steps, differentiable=True, first_order=first_order)

    def _inner_loop(self, start: AdaptedHead, features, labels, steps, differentiable: bool,
                    first_order: bool) -> AdaptedHead:
        weight, bias = start.weight, start.bias
        if not differentiable:
            weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        first_loss = None
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(features, weight, bias), labels)
            first_loss = loss.detach() if first_loss is None else first_loss
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias), create_graph=not first_order)
            weight = weight - self.config.inner_lr * grad_w
            bias = bias - self.config.inner_lr * grad_b
            if not differentiable:
                weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        if differentiable and first_loss is not None:
            # Training only: test-time adaptation (no_grad) reports no error, it just scores.
            with torch.no_grad():
                last_loss = F.cross_entropy(F.linear(features, weight, bias), labels)
            self._check_inner_loop(*torch.stack([first_loss, last_loss]).tolist(), steps, weight.shape[0])
        return AdaptedHead(weight, bias)

    def _check_inner_loop(self, first: float, last: float, steps: int, ways: int) -> None:
        if not math.isfinite(first):
            raise NonFiniteLossError(f"the support loss is {first} before any inner step: the features or θ are "
                                     f"not finite", settings=self._blame(()))
        if not math.isfinite(last) or last > INNER_DIVERGENCE_FACTOR * max(first, math.log(ways)):
            raise NonFiniteLossError(
                f"the inner loop diverged: the support loss went from {first:.3g} to {last:.3g} in {steps} "
                f"steps at inner_lr {self.config.inner_lr:.3g}", settings=("inner_lr",))

    def _blame(self, unmoved: Tuple[str, ...]) -> Tuple[str, ...]:
        # Once the outer loop has moved Φ and θ, their lrs are the suspects of a loss gone wrong;
        # before (Adam has no state yet), ``unmoved``: the inner lr, or nothing (the data).
        return tuple(dict.fromkeys(self._lr_names())) if self.optimizer.state else unmoved

    def _group_norms(self) -> torch.Tensor:
        return torch.stack([torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in g["params"]]))
                            for g in self.optimizer.param_groups])

    def _check_step(self, before: torch.Tensor) -> None:
        """Raise if the outer step just taken made Φ or θ non-finite, or blew their norm up."""
        after = self._group_norms()
        what = {"encoder_lr": "Φ (the encoder's trainable weights)", "head_lr": "θ (the head's initialisation)"}
        for (old, new), name in zip(torch.stack([before, after], dim=1).tolist(), self._lr_names()):
            if not math.isfinite(new):
                raise NonFiniteLossError(f"a value of {what[name]} became NaN or infinite", settings=(name,))
            if new > STEP_GROWTH_LIMIT * old > 0:
                raise NonFiniteLossError(f"the norm of {what[name]} went from {old:.3g} to {new:.3g} in one step",
                                         settings=(name,))
        # Batch-norm statistics that train (scratch encoders, bn="train") are checked too.
        if not all_finite(self.encoder.buffers()):
            raise NonFiniteLossError("a batch-norm statistic became NaN or infinite", settings=self._blame(()))

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: Optional[int] = None,
        first_order: Optional[bool] = None,
        ways: Optional[int] = None,
    ) -> AdaptedHead:
        """Encode the support images once and adapt θ on them (see :meth:`adapt_features`).

        Example::

            head = learner.adapt(support_x, support_y)
            loss = F.cross_entropy(head(learner.features(query_x)), query_y)
        """
        return self.adapt_features(self.features(support_x), support_y, steps, first_order, ways)

    def task_loss(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query loss after adapting on the support set, and the query logits.

        Support and query images go through the encoder in one batch, once.

        Example::

            loss, logits = learner.task_loss(sx, sy, qx, qy)
            loss.backward()   # gradients on learner.meta_parameters()
        """
        features = self.features(torch.cat([support_x, query_x]))
        support, query = features[: len(support_x)], features[len(support_x):]
        head = self.adapt_features(support, support_y)
        logits = head(query)
        return F.cross_entropy(logits, query_y.to(self.device).long()), logits

    def meta_train_step(
        self,
        tasks: Iterable,
        on_task: Optional[Callable[[Any, torch.Tensor, torch.Tensor], None]] = None,
    ) -> MetaStepResult:
        """One outer update on a meta-batch: the mean query loss of ``tasks``.

        ``tasks`` yields learn2learn ``(data, labels)`` tasks (``shots`` support
        samples per class, the rest queries), ``(sx, sy, qx, qy)`` tuples or
        ``SampledTask``s; it is read lazily and ``on_task(task, query_logits,
        query_y)`` runs after each task, so a hard-task meta-batch can record
        failures before drawing its hard tasks.

        Divergence raises :class:`~mtl_plugin.errors.NonFiniteLossError`, whose
        ``settings`` name the likely learning rate(s):

        * before any update: a task's inner loop ending with its support loss non-finite
          or above ``INNER_DIVERGENCE_FACTOR`` x max(its start, ln(ways)) (``inner_lr``);
          a query loss that is non-finite or above ``DIVERGENCE_FACTOR`` x ln(ways)
          (``inner_lr`` before the first outer step, then ``encoder_lr`` / ``head_lr``);
        * after the update: a value of Φ or θ non-finite, or the norm of either grown by
          more than ``STEP_GROWTH_LIMIT`` x in the step (its lr), or a non-finite
          batch-norm statistic. The update is then already applied.

        Example::

            result = learner.meta_train_step([taskset.sample() for _ in range(2)])
        """
        self.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, accuracies, hard = [], [], []
        try:
            for task in tasks:
                support_x, support_y, query_x, query_y = _support_query(task, self.config.shots)
                loss, logits = self.task_loss(support_x, support_y, query_x, query_y)
                value = loss.item()
                if not math.isfinite(value) or value > DIVERGENCE_FACTOR * math.log(logits.shape[1]):
                    raise NonFiniteLossError(f"the query loss of task {len(losses) + 1} of the meta-batch is "
                                             f"{value:.3g}", settings=self._blame(("inner_lr",)))
                # One backward per task frees its graph before the next task is encoded.
                loss.backward()
                query_y = query_y.to(self.device)
                losses.append(value)
                accuracies.append(100.0 * (logits.argmax(dim=1) == query_y).float().mean().item())
                hard.append(bool(getattr(task, "hard", False)))
                if on_task is not None:
                    on_task(task, logits.detach(), query_y)
        except NonFiniteLossError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if not losses:
            raise ValueError("tasks is empty: a meta-batch needs at least one task")
        for parameter in self.meta_parameters():
            if parameter.grad is not None:
                parameter.grad /= len(losses)
        before = self._group_norms()
        self.optimizer.step()
        self._check_step(before)
        return MetaStepResult(_mean(losses), _mean(accuracies), len(losses), accuracies, hard)

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Adapt the head on the support set for ``test_inner_steps`` and return query logits.

        The prototype init takes any ``ways``; a Kaiming head only its own.

        Example::

            logits = learner.predict(support_x, support_y, query_x, ways=5)
        """
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                head = self.adapt(support_x, support_y, steps=self.config.test_inner_steps, ways=ways)
                return head(self.features(query_x))
        finally:
            self.encoder.train(was_training)


def load_learner_state(learner: MetaTransferLearner, state: dict, source: str = "checkpoint") -> None:
    """Load ``learner.state_dict()``-style weights after checking every name and shape.

    Raises ``ValueError`` naming the first layer that differs, e.g. for a
    checkpoint of another architecture, granularity or number of ways.

    Example::

        load_learner_state(learner, torch.load("runs/meta/best.pt")["learner"], "best.pt")
    """
    own = learner.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise ValueError(f"{source} has no tensor {name!r}: it was written for another architecture")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source} holds {name!r} of shape {tuple(state[name].shape)} but this model's is "
                f"{tuple(tensor.shape)}: it was written for another architecture (or number of ways)"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{source} has tensors this model lacks, e.g. {extra[0]!r}: another architecture")
    learner.load_state_dict(state)


@dataclass
class MetaTrainResult:
    """Where a meta-training run left its files, and its best validation accuracy.

    Example::

        result = meta_train(learner, benchmark, "runs/meta")
        print(result.best_accuracy, result.best_checkpoint)
    """

    run_dir: Path
    iterations: int
    best_accuracy: float
    best_iteration: int

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.csv"


class _TaskStream:
    """The meta-batches of a run, plain or hard-task, and the generators behind them."""

    def __init__(self, dataset, config: MetaTrainConfig):
        from mtl_plugin.hard_tasks import ClassAccuracyTracker, HardTaskMetaBatch, HardTaskTransform

        self.config = config
        self.tasks = build_taskset(dataset, config.ways, config.shots, config.queries, -1, config.seed)
        rngs = {id(t.rng): t.rng for t in self.tasks.task_transforms if hasattr(t, "rng")}
        self.rngs: List[random.Random] = list(rngs.values())
        self.sampler = None
        if config.hard_tasks:
            meta_dataset = self.tasks.dataset
            self.tracker = ClassAccuracyTracker(meta_dataset, seed=random.Random(config.seed + 1),
                                                history_decay=config.hard_history_decay)
            hard_rng = random.Random(config.seed + 2)
            hard_tasks = l2l.data.Taskset(
                meta_dataset,
                task_transforms=[
                    HardTaskTransform(meta_dataset, config.ways, self.tracker, config.hard_task_mode, hard_rng),
                    KShots(meta_dataset, config.shots + config.queries, seed=hard_rng),
                    l2l.data.transforms.LoadData(meta_dataset),
                    RemapLabels(meta_dataset, seed=hard_rng),
                ],
                num_tasks=-1,
            )
            self.sampler = HardTaskMetaBatch(
                self.tasks, hard_tasks, k=config.meta_batch, k_hard=config.hard_meta_batch,
                seed=random.Random(config.seed + 3),
            )
            # The tracker's own generator travels in its state_dict.
            self.rngs += [hard_rng, self.sampler.rng]

    def next_batch(self) -> Tuple[Iterable, Optional[Callable]]:
        if self.sampler is None:
            # With num_tasks=-1 every read draws a fresh task from the private generators.
            return [self.tasks[0] for _ in range(self.config.meta_batch)], None
        return self.sampler.sample(), self._record

    def _record(self, task, logits: torch.Tensor, query_y: torch.Tensor) -> None:
        if not task.hard:
            self.tracker.record(task.classes, logits.cpu(), query_y.cpu(), indices=task.indices)

    def state(self) -> dict:
        state = {"rng": capture_rng_state(self.rngs)}
        if self.sampler is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_state(self, state: dict) -> None:
        restore_rng_state(state["rng"], self.rngs)
        if self.sampler is not None:
            self.tracker.load_state_dict(state["tracker"])


def _lower(config: MetaTrainConfig, name: str) -> float:
    # The paper's value when above it, else a tenth.
    value, default = getattr(config, name), next(f.default for f in fields(MetaTrainConfig) if f.name == name)
    return default if value > default else value / 10


def _stopped(error: NonFiniteLossError, iteration: int, config: MetaTrainConfig, log: RunLog,
             saved: int) -> NonFiniteLossError:
    """The message of a diverged run: where, the likely lr and what to run next."""
    lrs = " or ".join(f"{name} {getattr(config, name):.3g}" for name in error.settings)
    flags = " ".join(f"--{name.replace('_', '-')} {_lower(config, name):.3g}" for name in error.settings)
    if error.settings:
        cause = f"Likely cause: {lrs} is too high"
        remedy = f"with a lower lr, e.g. {'--resume ' if saved else ''}{flags}"
    else:
        cause = "Check the data and the pretrained weights for NaN or infinite values"
        remedy = "once they are fixed"
    if saved:
        kept = [str(path) for path in (log.last_path, log.best_path) if path.is_file()]
        kept[0] += f" (iteration {saved})"
        kept = f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept as before; continue {remedy}"
    else:
        kept = f"no checkpoint was written yet; start again {remedy}"
    return NonFiniteLossError(f"meta-training diverged at iteration {iteration}: {error}. {cause}: {kept}",
                              settings=error.settings)


def _resume(learner: MetaTransferLearner, stream: "_TaskStream", state: dict, identity: dict, override: bool,
            log: RunLog) -> Tuple[int, float, int]:
    """Load the run saved in ``state`` (its ``last.pt``) after checking that it is the same run."""
    config, path = learner.config, log.last_path
    saved_identity = dict(state["model"], **({"train_data": state["data"]} if "data" in state else {}))
    check_same_run(path, saved_identity, identity, state["config"], asdict(config), _MAY_CHANGE_ON_RESUME,
                   override)
    new_lrs = [name for name in _LEARNING_RATES if state["config"].get(name) != getattr(config, name)]
    if new_lrs and state["iteration"] >= config.iterations:
        raise UsageError(f"{path}: the run is finished (iteration {state['iteration']} of {config.iterations}), so "
                         f"a new {new_lrs[0]} changes nothing: pass more --iterations to continue it, --overwrite "
                         f"to train anew, or another --out")
    try:
        load_learner_state(learner, state["learner"], str(path))
        stream.load_state(state["stream"])
    except ValueError as error:
        raise DataError(f"--out {log.run_dir}: {error}; pass --overwrite to train anew there, "
                        f"or another --out") from error
    learner.optimizer.load_state_dict(state["optimizer"])
    # The config's lrs replace the saved ones (the remedy for a diverged run); the schedule is
    # rebuilt under them and brought to the step the run had reached.
    learner.apply_learning_rates(state["scheduler"]["last_epoch"])
    log.rows = list(state["metrics"])
    return state["iteration"], state["best_accuracy"], state["best_iteration"]


def meta_train(
    learner: MetaTransferLearner,
    benchmark: Any,
    out_dir: Union[str, Path],
    resume: bool = False,
    progress: bool = True,
    model_info: Optional[dict] = None,
    overwrite: bool = False,
    override: bool = False,
) -> MetaTrainResult:
    """Meta-train ``learner`` on ``benchmark.train``, validating on ``benchmark.val``.

    Writes ``metrics.csv`` (one row per iteration: loss, accuracy, the accuracy
    of the normal and of the hard tasks (NaN without hard tasks), and validation
    columns every ``val_every``), ``curve.png`` (:func:`plot_meta_curves`: the
    validation accuracy and the normal against the hard tasks' training
    accuracy), ``best.pt`` and ``last.pt`` (every ``checkpoint_every`` iterations
    and with every new ``best.pt``) into ``out_dir``. ``model_info`` (e.g. the
    backbone name) is stored in the checkpoints so that ``mtl evaluate`` can
    rebuild the model; the checkpoints also record the training data
    (:func:`~mtl_plugin.data.benchmark.benchmark_identity`). On return the
    learner holds the best validation weights.

    Args:
        learner: the learner; its config is the run's.
        benchmark: a :class:`~mtl_plugin.data.FewShotBenchmark` (or an object with its splits).
        out_dir: the run's folder.
        resume: continue the run in ``out_dir`` from ``last.pt``: a killed run ends in the
            state an uninterrupted one reaches, a finished one returns at once. The config's
            ``encoder_lr``, ``head_lr`` and ``inner_lr`` replace the saved ones.
        progress: a progress bar.
        model_info: what ``mtl evaluate`` needs to rebuild the model.
        overwrite: delete the run in ``out_dir`` and train anew.
        override: with ``resume``, continue under settings of the config that differ from
            the saved run's (other than the lrs and ``iterations``, which may always change).

    Returns:
        Where the run is and its best validation accuracy.

    Raises:
        UsageError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given;
            the config differs from the run resumed without ``override``; a new lr for a
            finished run.
        DataError: the run in ``out_dir`` was written for other data or another model, or its
            ``last.pt`` is unreadable.
        NonFiniteLossError: the run diverged (see :meth:`MetaTransferLearner.meta_train_step`;
            ``last.pt`` and ``best.pt`` are also checked before every save). The message names
            the iteration, the likely lr and a lower one; the checkpoints are left as they were.

    Example::

        learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTrainConfig(iterations=2000))
        result = meta_train(learner, get_benchmark("kanji"), "runs/meta", resume=True)
    """
    config = learner.config
    if learner.ways != config.ways:
        raise ValueError(f"the learner is {learner.ways}-way but config.ways={config.ways}")
    # The train split is checked by build_taskset; check val now rather than at the first validation.
    check_task_shape(benchmark.val, config.ways, config.shots + config.queries)
    previous = previous_run(out_dir, resume, overwrite, CHECKPOINT_KIND, "mtl meta-train", "meta-training run")
    stream = _TaskStream(benchmark.train, config)
    log = RunLog(out_dir)
    if overwrite:
        for path in (log.last_path, log.best_path, log.csv_path, log.curve_path):
            path.unlink(missing_ok=True)
    model, data = dict(model_info or {}), benchmark_identity(benchmark)
    start, best_accuracy, best_iteration = 0, -math.inf, 0
    if previous is not None:
        identity = dict(model, train_data=data)
        start, best_accuracy, best_iteration = _resume(learner, stream, previous, identity, override, log)
    saved = start
    val_config = EvaluationConfig(config.ways, config.shots, config.queries, config.val_tasks, config.seed)
    bar = progress_bar(range(start, config.iterations), initial=start, total=config.iterations,
               desc="meta-train", disable=not progress)
    for index in bar:
        iteration = index + 1
        tasks, on_task = stream.next_batch()
        try:
            step = learner.meta_train_step(tasks, on_task)
        except NonFiniteLossError as error:
            raise _stopped(error, iteration, config, log, saved) from error
        learner.scheduler.step()
        row = {"iteration": iteration, "loss": step.loss, "accuracy": step.accuracy,
               "normal_accuracy": step.normal_accuracy, "hard_accuracy": step.hard_accuracy,
               "encoder_lr": learner.optimizer.param_groups[0]["lr"],
               "val_accuracy": math.nan, "val_ci95": math.nan}
        improved = False
        if iteration % config.val_every == 0 or iteration == config.iterations:
            result = evaluate(learner.predict, benchmark.val, val_config, progress=False)
            row["val_accuracy"], row["val_ci95"] = result.mean, result.ci95
            improved = result.mean > best_accuracy
        log.append(row)
        if improved:
            best_accuracy, best_iteration = result.mean, iteration
        bar.set_postfix(loss=f"{step.loss:.3f}", acc=f"{step.accuracy:.1f}",
                        val=f"{best_accuracy:.1f}" if best_accuracy > -math.inf else "-")
        # A new best.pt comes with a last.pt, so that a run folder holding best.pt can always resume.
        if improved or iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            if not all_finite(learner.state_dict().values()):
                error = NonFiniteLossError("a weight or batch-norm statistic is not finite",
                                           settings=learner._blame(()))
                raise _stopped(error, iteration, config, log, saved)
            header = {"kind": CHECKPOINT_KIND, "model": model, "data": data, "config": asdict(config),
                      "iteration": iteration, "learner": learner.state_dict()}
            if improved:
                save_checkpoint(dict(header, val_accuracy=result.mean), log.best_path)
            save_checkpoint(
                dict(header, optimizer=learner.optimizer.state_dict(), scheduler=learner.scheduler.state_dict(),
                     stream=stream.state(), best_accuracy=best_accuracy, best_iteration=best_iteration,
                     metrics=log.rows),
                log.last_path,
            )
            log.write()
            plot_meta_curves([("", pd.DataFrame(log.rows))], log.curve_path)
            saved = iteration
    if log.best_path.is_file():
        best = read_checkpoint(log.best_path, "--out", map_location=learner.device)
        load_learner_state(learner, best["learner"], str(log.best_path))
    return MetaTrainResult(Path(out_dir), config.iterations, best_accuracy, best_iteration)


def plot_meta_curves(runs: List[Tuple[str, pd.DataFrame]], path: Union[str, Path], title: str = "") -> None:
    """Draw meta-training curves: validation accuracy, and normal against hard tasks' training accuracy.

    Args:
        runs: ``(label, metrics)`` pairs, ``metrics`` as :func:`meta_train` writes
            ``metrics.csv``; the label names the run in the legend ("" for one run).
        path: the PNG to write (atomically).
        title: the figure's title.

    The training accuracies are running means over ``max(5, iterations // 20)``
    iterations: one meta-batch's few tasks make the raw curve too noisy to read.

    Example::

        plot_meta_curves([("mtl", pd.read_csv("a/metrics.csv")), ("mtl-ht", pd.read_csv("b/metrics.csv"))],
                         "mtl-vs-mtl-ht.png")
    """
    # The Figure API needs no pyplot backend: headless, and the caller's backend is left alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    validation, training = figure.subplots(1, 2)
    for index, (label, frame) in enumerate(runs):
        color = f"C{index}"
        prefix = f"{label} " if label else ""
        val = frame.dropna(subset=["val_accuracy"])
        validation.plot(val["iteration"], val["val_accuracy"], marker="o", color=color, label=label or None)
        window = max(5, len(frame) // 20)
        for column, style in (("normal_accuracy", "-"), ("hard_accuracy", "--")):
            if column in frame and frame[column].notna().any():
                smooth = frame[column].rolling(window, min_periods=1).mean()
                training.plot(frame["iteration"], smooth, style, color=color,
                              label=f"{prefix}{column.split('_')[0]} tasks")
    validation.set_ylabel("validation accuracy (%)")
    training.set_ylabel("training query accuracy (%), running mean")
    for axis in (validation, training):
        axis.set_xlabel("meta-training iteration")
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    atomic_save_figure(figure, path, dpi=100)
