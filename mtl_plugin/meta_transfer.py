"""Meta-transfer learning (Sun et al., CVPR 2019): meta-learn Φ (SS) and the FC head's initialisation θ.

Per task the encoder (an :class:`~mtl_plugin.ss.SSAdapter` around the pretrained
backbone) runs once on support and query images together. The inner loop adapts
only the linear head, functionally (plain tensors ``W, b`` and
``torch.autograd.grad``), on those features: the backbone never runs again and
no frozen weight is copied. The outer loop updates the encoder's trainable
parameters (Φ) at ``encoder_lr`` and θ at ``head_lr``
(:meth:`MetaTransferLearner.parameter_groups`), second order unless ``first_order``.

Like learn2learn's ``MAML``, the learner is the method only and holds no optimiser: a
user's loop drives it with its own over ``parameter_groups()`` and backpropagates
``task_loss`` (``examples/own_loop.py``). This package's own outer loop, the paper's Adam
with its step schedule, divergence checks and the all-reduce under ``torchrun``, is
:class:`mtl_plugin.training.meta_step.MetaTrainer`; the long-run loop (hard-task
meta-batch, validation, checkpoints, resume) is :func:`mtl_plugin.training.meta_training.meta_train`.

The head's starting point (``head_init``) is by default built from each task's
support set, so that it does not depend on the arbitrary order of a task's
labels (see :class:`~mtl_plugin.meta_config.MetaTransferConfig`); ``"kaiming"`` is the
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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.heads import AdaptedHead, adapt_head, declared_width, prototype_head
from mtl_plugin.meta_config import HEAD_INITS, MetaTrainConfig, MetaTransferConfig
from mtl_plugin.speedups import EncoderRunner, Speedups, uses_batch_statistics

__all__ = [
    "HEAD_INITS",
    "AdaptedHead",
    "MetaTransferConfig",
    "MetaTrainConfig",
    "MetaTransferLearner",
    "load_learner_state",
]


class MetaTransferLearner(nn.Module):
    """An encoder whose trainable parameters (Φ) are meta-learned with a meta-learned linear head θ.

    ``encoder`` is usually ``SSAdapter(pretrained_backbone)`` (only Φ trainable);
    a plain backbone gives the "train from scratch" ablation (all weights learned).
    θ is ``head_metric`` (d) with ``config.head_init="prototype"``, from which each
    task's head starts at its support set's class means (any number of classes),
    or ``head_weight`` and ``head_bias`` with ``"kaiming"`` (a ``ways``-way head).
    ``config`` is an :class:`~mtl_plugin.meta_config.MetaTransferConfig` (a ``MetaTrainConfig`` is one).
    ``speedups`` (:class:`~mtl_plugin.speedups.Speedups`, keyword-only) choose how the
    encoder runs; none changes what is learned beyond float tolerance, except autocast.
    As learn2learn's ``MAML``, it holds no optimiser: your loop backpropagates
    :meth:`task_loss` and steps its own optimiser over :meth:`parameter_groups`
    (:class:`~mtl_plugin.training.meta_step.MetaTrainer` is the paper's).

    Example::

        learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTransferConfig())
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
        config: MetaTransferConfig | None = None,
        feature_dim: int | None = None,
        *,
        speedups: Speedups | None = None,
    ):
        super().__init__()
        self.config = config or MetaTransferConfig()
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

    def initial_head(self, features: torch.Tensor, labels: torch.Tensor, ways: int | None = None) -> AdaptedHead:
        """The head a task's inner loop starts from, on its support ``features`` and ``labels``.

        Args:
            features: support features, shape (n, feature_dim).
            labels: their task labels, 0..ways-1.
            ways: the task's number of classes; default: the head's for Kaiming,
                ``labels.max() + 1`` for the prototype init.

        Returns:
            With the prototype init, the head at the support set's class means weighted by
            d (:func:`~mtl_plugin.heads.prototype_head`), differentiable with respect to d
            and the features; with Kaiming, θ itself.

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
        return prototype_head(features, labels, self.head_metric, ways)

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
            NonFiniteLossError: the inner loop diverged (:func:`~mtl_plugin.heads.adapt_head`).

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
                head = adapt_head(start, features, labels, steps, self.config.inner_lr, differentiable=False)
            return AdaptedHead(head.weight.detach(), head.bias.detach())
        start = self.initial_head(features, labels, ways)
        if first_order:
            # First order drops the inner-loop gradients' path to Φ; the start keeps its own.
            features = features.detach()
        return adapt_head(start, features, labels, steps, self.config.inner_lr, first_order=first_order)

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
        return self.task_losses([(support_x, support_y, query_x, query_y)])[0]

    def task_losses(self, tasks: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`task_loss` of each ``(sx, sy, qx, qy)`` of ``tasks``, their images encoded in one pass.

        Example::

            losses = [loss for loss, _ in learner.task_losses([(sx1, sy1, qx1, qy1), (sx2, sy2, qx2, qy2)])]
        """
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
                :data:`~mtl_plugin.heads.INNER_DIVERGENCE_FACTOR` x max(its start, ln(ways)), as in training
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
    checkpoint of another architecture, granularity or number of ways. A meta-training
    checkpoint's weights go in through :func:`~mtl_plugin.training.checkpoints.load_learner_weights`,
    which turns that into a ``DataError`` naming the file.

    Example::

        load_learner_state(learner, read_meta_checkpoint("runs/meta/best.pt")["learner"], "best.pt")
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
