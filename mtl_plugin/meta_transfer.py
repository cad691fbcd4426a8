"""Meta-transfer learning (Sun et al., CVPR 2019): meta-learn Φ (SS) and the FC head's initialisation θ.

Per task the encoder (an :class:`~mtl_plugin.ss.SSAdapter` around the pretrained
backbone) runs once on support and query images together. The inner loop adapts
only the linear head, functionally (plain tensors ``W, b`` and
``torch.autograd.grad``), on those features: the backbone never runs again and
no frozen weight is copied. The outer loop updates the encoder's trainable
parameters (Φ) at ``encoder_lr`` and θ at ``head_lr``
(:meth:`MetaTransferLearner.parameter_groups`), second order unless ``first_order``.

Like learn2learn's ``MAML``, the learner is the method only: a user's loop drives it
with its own optimiser over ``parameter_groups()`` and backpropagates ``task_loss``
(``examples/own_loop.py``). This package's own outer loop, the paper's Adam with its
step schedule, divergence checks and the all-reduce under ``torchrun``, is
:class:`mtl_plugin.training.meta_step.MetaTrainer` (:meth:`MetaTransferLearner.meta_train_step`
delegates to it); the long-run loop (hard-task meta-batch, validation, checkpoints,
resume) is :func:`mtl_plugin.training.meta_training.meta_train`.

The head's starting point (``head_init``) is by default built from each task's
support set, so that it does not depend on the arbitrary order of a task's
labels (see :class:`~mtl_plugin.meta_config.MetaTrainConfig`); ``"kaiming"`` is the
official code's per-label-position θ, kept for comparison.

Example::

    learner = MetaTransferLearner(SSAdapter(pretrained_backbone), ways=5)
    optimizer = torch.optim.Adam(learner.parameter_groups())
    for iteration in range(1000):                      # a learn2learn Taskset works as is
        optimizer.zero_grad()
        for task in [taskset.sample() for _ in range(2)]:
            (sx, sy), (qx, qy) = split_support_query(*task, shots=1)
            loss, _ = learner.task_loss(sx, sy, qx, qy)
            (loss / 2).backward()
        optimizer.step()
    head = learner.adapt(support_x, support_y)         # test time: adapt θ on a support set
    logits = head(learner.features(query_x))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.errors import NonFiniteLossError
from mtl_plugin.heads import declared_width
from mtl_plugin.meta_config import HEAD_INITS, MetaTrainConfig
from mtl_plugin.prototypes import class_prototypes
from mtl_plugin.speedups import EncoderRunner, Speedups, uses_batch_statistics
from mtl_plugin.training.meta_step import MetaStepResult, MetaTrainer

__all__ = [
    "HEAD_INITS",
    "AdaptedHead",
    "MetaStepResult",
    "MetaTrainConfig",
    "MetaTransferLearner",
    "load_learner_state",
]

# Gradient descent on the inner loop's convex loss lowers the support loss at any stable
# inner_lr; ending ten times above where it started (or above chance level) is divergence.
INNER_DIVERGENCE_FACTOR = 10.0


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


class MetaTransferLearner(nn.Module):
    """An encoder whose trainable parameters (Φ) are meta-learned with a meta-learned linear head θ.

    ``encoder`` is usually ``SSAdapter(pretrained_backbone)`` (only Φ trainable);
    a plain backbone gives the "train from scratch" ablation (all weights learned).
    θ is ``head_metric`` (d) with ``config.head_init="prototype"``, from which each
    task's head starts at its support set's class means (any number of classes),
    or ``head_weight`` and ``head_bias`` with ``"kaiming"`` (a ``ways``-way head).
    ``speedups`` (:class:`~mtl_plugin.speedups.Speedups`, keyword-only) choose how the
    encoder runs; none changes what is learned beyond float tolerance, except autocast.
    As learn2learn's ``MAML``, it holds no optimiser: your loop backpropagates
    :meth:`task_loss` and steps its own optimiser over :meth:`parameter_groups`.
    :meth:`meta_train_step` is the convenience that runs the paper's checked Adam step
    (:class:`~mtl_plugin.training.meta_step.MetaTrainer`, built at its first call).

    Example::

        learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTrainConfig())
        optimizer = torch.optim.Adam(learner.parameter_groups())
        optimizer.zero_grad()
        loss, _ = learner.task_loss(support_x, support_y, query_x, query_y)
        loss.backward()
        optimizer.step()
        logits = learner.predict(support_x, support_y, query_x, ways=5)
    """

    def __init__(
        self,
        encoder: nn.Module,
        ways: int,
        config: MetaTrainConfig | None = None,
        feature_dim: int | None = None,
        *,
        speedups: Speedups | None = None,
    ):
        super().__init__()
        self.config = config or MetaTrainConfig(ways=ways)
        self.speedups = Speedups() if speedups is None else speedups
        feature_dim = feature_dim or declared_width(encoder)
        if feature_dim is None:
            raise ValueError(
                f"cannot tell the feature width of {type(encoder).__name__}: give it an int attribute "
                f"feature_dim or pass feature_dim="
            )
        self.encoder = encoder
        self._run_encoder = EncoderRunner(encoder, self.speedups)
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
        self._trainer: MetaTrainer | None = None

    @property
    def device(self) -> torch.device:
        return self.head_parameters()[0].device

    def head_parameters(self) -> list[nn.Parameter]:
        """θ: ``[head_metric]`` (prototype init) or ``[head_weight, head_bias]`` (Kaiming init)."""
        if self.config.head_init == "prototype":
            return [self.head_metric]
        return [self.head_weight, self.head_bias]

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the outer loop learns: the encoder's trainable parameters, then θ."""
        return [p for p in self.encoder.parameters() if p.requires_grad] + self.head_parameters()

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The meta-parameters as optimiser groups at the paper's lrs: Φ at ``encoder_lr``, θ at ``head_lr``.

        Φ's group is left out when the encoder has no trainable weight.

        Returns:
            ``[{"params": Φ, "lr": config.encoder_lr}, {"params": θ, "lr": config.head_lr}]``.

        Example::

            optimizer = torch.optim.Adam(learner.parameter_groups())
        """
        groups = []
        encoder_parameters = [p for p in self.encoder.parameters() if p.requires_grad]
        if encoder_parameters:
            groups.append({"params": encoder_parameters, "lr": self.config.encoder_lr})
        groups.append({"params": self.head_parameters(), "lr": self.config.head_lr})
        return groups

    @property
    def trainer(self) -> MetaTrainer:
        """The :class:`~mtl_plugin.training.meta_step.MetaTrainer` behind :meth:`meta_train_step`,
        built at first use."""
        if self._trainer is None:
            self._trainer = MetaTrainer(self)
        return self._trainer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The Adam optimiser of :meth:`meta_train_step` (``trainer.optimizer``)."""
        return self.trainer.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.StepLR:
        """The lr schedule of :meth:`meta_train_step` (``trainer.scheduler``)."""
        return self.trainer.scheduler

    def meta_train_step(
        self,
        tasks: Iterable,
        on_task: Callable[[Any, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> MetaStepResult:
        """One checked Adam step on a meta-batch:
        :meth:`MetaTrainer.step <mtl_plugin.training.meta_step.MetaTrainer.step>`.

        Args:
            tasks: the meta-batch (any iterable of tasks, read once, in order).
            on_task: called as ``on_task(task, query_logits, query_y)`` after each task.

        Returns:
            The meta-batch's mean query loss and accuracy, per task and normal/hard.

        Raises:
            NonFiniteLossError: the step diverged; its ``settings`` name the likely lr.
            ValueError: ``tasks`` is empty, or a task of another shape.

        Example::

            result = learner.meta_train_step([taskset.sample() for _ in range(2)])
        """
        return self.trainer.step(tasks, on_task)

    def initial_head(self, features: torch.Tensor, labels: torch.Tensor, ways: int | None = None) -> AdaptedHead:
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

    def features(self, x: torch.Tensor, slices: Sequence[int] | None = None) -> torch.Tensor:
        """The encoder's flat features of a batch of images.

        Args:
            x: images ``(B, C, H, W)`` (moved to the learner's device).
            slices: sample counts of consecutive separate tasks in ``x``: a BatchNorm in
                training normalises each with its own statistics, as one pass each would.

        Returns:
            Features ``(B, feature_dim)``.

        Example::

            features = learner.features(support_x)
        """
        return self._run_encoder(x.to(self.device), slices)

    def adapt_features(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        steps: int | None = None,
        first_order: bool | None = None,
        ways: int | None = None,
    ) -> AdaptedHead:
        """Adapt the head from :meth:`initial_head` on support ``features`` by ``steps`` steps at ``inner_lr``.

        With gradients enabled the result stays differentiable with respect to θ
        and to the features: through the class means of the prototype init, and
        (second order) through the inner-loop gradients. Under ``torch.no_grad()``
        it is a plain, detached fine-tuning of the head.

        Args:
            features: support features ``(n, feature_dim)``.
            labels: their task labels ``0..ways-1``.
            steps: inner steps; default ``config.inner_steps``.
            first_order: drop second-order terms; default ``config.first_order``.
            ways: the task's classes; default as :meth:`initial_head`.

        Returns:
            The adapted head, callable on query features.

        Raises:
            ValueError: a label out of range or a class without support samples.

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

    def _inner_loop(
        self, start: AdaptedHead, features, labels, steps, differentiable: bool, first_order: bool
    ) -> AdaptedHead:
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
        if first_loss is not None:
            # Test-time adaptation too: a head adapted by a diverged loop scores at chance, a wrong number.
            with torch.no_grad():
                last_loss = F.cross_entropy(F.linear(features, weight, bias), labels)
            self._check_inner_loop(*torch.stack([first_loss, last_loss]).tolist(), steps, weight.shape[0])
        return AdaptedHead(weight, bias)

    def _check_inner_loop(self, first: float, last: float, steps: int, ways: int) -> None:
        if not math.isfinite(first):
            raise NonFiniteLossError(
                f"the support loss is {first} before any inner step: the features or θ are not finite"
            )
        if not math.isfinite(last) or last > INNER_DIVERGENCE_FACTOR * max(first, math.log(ways)):
            raise NonFiniteLossError(
                f"the inner loop diverged: the support loss went from {first:.3g} to {last:.3g} in {steps} "
                f"steps at inner_lr {self.config.inner_lr:.3g}",
                settings=("inner_lr",),
            )

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        first_order: bool | None = None,
        ways: int | None = None,
    ) -> AdaptedHead:
        """Encode the support images once and adapt θ on them (see :meth:`adapt_features`).

        Args:
            support_x: support images.
            support_y: their task labels.
            steps: inner steps; default ``config.inner_steps``.
            first_order: drop second-order terms; default ``config.first_order``.
            ways: the task's classes.

        Returns:
            The adapted head.

        Raises:
            ValueError: as :meth:`adapt_features`.

        Example::

            head = learner.adapt(support_x, support_y)
            loss = F.cross_entropy(head(learner.features(query_x)), query_y)
        """
        return self.adapt_features(self.features(support_x), support_y, steps, first_order, ways)

    def task_loss(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss after adapting on the support set, and the query logits.

        Support and query images go through the encoder in one batch, once; the support
        alone under ``torch.no_grad()`` where ``Speedups.support_without_graph`` applies.

        Args:
            support_x: support images.
            support_y: their task labels.
            query_x: query images.
            query_y: their task labels.

        Returns:
            ``(loss, logits)``: the mean cross-entropy of the queries and their logits.

        Example::

            loss, logits = learner.task_loss(sx, sy, qx, qy)
            loss.backward()   # gradients on learner.meta_parameters()
        """
        return self._task_losses([(support_x, support_y, query_x, query_y)])[0]

    def _task_losses(self, tasks: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(query loss, query logits)`` of each ``(sx, sy, qx, qy)`` of ``tasks``, encoded in one pass."""
        supports, queries = [task[0] for task in tasks], [task[2] for task in tasks]
        if (
            self.speedups.support_without_graph
            and self.config.first_order
            and self.config.head_init == "kaiming"
            and torch.is_grad_enabled()
            and not uses_batch_statistics(self.encoder)
        ):
            # First order drops the inner loop's path to Φ and the Kaiming start ignores the support
            # features: their graph would never be used. (BN in training would tie them to the queries.)
            with torch.no_grad():
                support_features = self.features(torch.cat(supports)).split([len(x) for x in supports])
            query_features = self.features(torch.cat(queries)).split([len(x) for x in queries])
        else:
            images = [x for task in tasks for x in (task[0], task[2])]
            slices = [len(task[0]) + len(task[2]) for task in tasks]
            encoded = self.features(torch.cat(images), slices).split([len(x) for x in images])
            support_features, query_features = encoded[0::2], encoded[1::2]
        results = []
        for (_, support_y, _, query_y), support, query in zip(tasks, support_features, query_features):
            logits = self.adapt_features(support, support_y)(query)
            results.append((F.cross_entropy(logits, query_y.to(self.device).long()), logits))
        return results

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Adapt the head on the support set for ``test_inner_steps`` and return query logits.

        The prototype init takes any ``ways``; a Kaiming head only its own.

        Args:
            support_x: support images.
            support_y: their task labels.
            query_x: query images.
            ways: the task's classes.

        Returns:
            Query logits ``(queries, ways)``, without gradients.

        Raises:
            NonFiniteLossError: the adaptation diverged: its support loss ended non-finite or above
                ``INNER_DIVERGENCE_FACTOR`` x max(its start, ln(ways)), as in training
                (``settings == ("inner_lr",)``); its scores would be chance level.

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
