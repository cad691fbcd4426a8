"""Meta-transfer learning (Sun et al., CVPR 2019): meta-learn Φ (SS) and the FC head's initialisation θ.

Per task the encoder (an :class:`~mtl_plugin.ss.SSAdapter` around the pretrained
backbone) runs once on support and query images together. The inner loop adapts
only the linear head, functionally (plain tensors ``W, b`` and
``torch.autograd.grad``), on those features: the backbone never runs again and
no frozen weight is copied. The outer loop (Adam) updates the encoder's trainable
parameters (Φ) at ``encoder_lr`` and θ at ``head_lr``, second order unless
``first_order``. Every outer step is checked for divergence (see
:meth:`MetaTransferLearner.meta_train_step`): it raises
:class:`~mtl_plugin.errors.NonFiniteLossError` naming the likely learning rate.
The long-run loop (hard-task meta-batch, validation, checkpoints, resume) is
:func:`mtl_plugin.meta_training.meta_train`.

The head's starting point (``head_init``) is by default built from each task's
support set, so that it does not depend on the arbitrary order of a task's
labels (see :class:`~mtl_plugin.meta_config.MetaTrainConfig`); ``"kaiming"`` is the
official code's per-label-position θ, kept for comparison.

Example::

    learner = MetaTransferLearner(SSAdapter(pretrained_backbone), ways=5)
    for iteration in range(1000):                      # a learn2learn Taskset works as is
        result = learner.meta_train_step([taskset.sample() for _ in range(2)])
    head = learner.adapt(support_x, support_y)         # test time: adapt θ on a support set
    logits = head(learner.features(query_x))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin import distributed
from mtl_plugin.heads import declared_width
from mtl_plugin.meta_config import HEAD_INITS, MetaTrainConfig
from mtl_plugin.prototypes import class_prototypes
from mtl_plugin.run_log import DIVERGENCE_FACTOR, NonFiniteLossError, all_finite, fast_forward
from mtl_plugin.speedups import EncoderRunner, Speedups, uses_batch_statistics
from mtl_plugin.tasks import split_support_query

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
# Adam moves each weight by about its lr per step: a step that multiplies the norm of Φ or θ
# by ten comes from an lr far above the weights' own scale, not from learning.
STEP_GROWTH_LIMIT = 10.0


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


def _task_groups(tasks: Iterable, together: bool) -> Iterator[list]:
    """The meta-batch in the groups that may be encoded together, read in order.

    A hard-task meta-batch (``groups()``) gives its normal tasks, then its hard ones,
    which it draws only once the normal ones are recorded; a list or tuple is one group;
    any other iterable is read one task at a time, as it may depend on ``on_task``.
    """
    if together and callable(getattr(tasks, "groups", None)):
        yield from (list(group) for group in tasks.groups() if len(group))
    elif together and isinstance(tasks, Sequence):
        if len(tasks):
            yield list(tasks)
    else:
        yield from ([task] for task in tasks)


class MetaTransferLearner(nn.Module):
    """An encoder whose trainable parameters (Φ) are meta-learned with a meta-learned linear head θ.

    ``encoder`` is usually ``SSAdapter(pretrained_backbone)`` (only Φ trainable);
    a plain backbone gives the "train from scratch" ablation (all weights learned).
    θ is ``head_metric`` (d) with ``config.head_init="prototype"``, from which each
    task's head starts at its support set's class means (any number of classes),
    or ``head_weight`` and ``head_bias`` with ``"kaiming"`` (a ``ways``-way head).
    ``speedups`` (:class:`~mtl_plugin.speedups.Speedups`, keyword-only) choose how the
    encoder runs; none changes what is learned beyond float tolerance, except autocast.
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
        *,
        speedups: Optional[Speedups] = None,
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

    def features(self, x: torch.Tensor, slices: Optional[Sequence[int]] = None) -> torch.Tensor:
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
        steps: Optional[int] = None,
        first_order: Optional[bool] = None,
        ways: Optional[int] = None,
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
        if first_loss is not None:
            # Test-time adaptation too: a head adapted by a diverged loop scores at chance, a wrong number.
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
    ) -> Tuple[torch.Tensor, torch.Tensor]:
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
        if (self.speedups.support_without_graph and self.config.first_order and self.config.head_init == "kaiming"
                and torch.is_grad_enabled() and not uses_batch_statistics(self.encoder)):
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

        Under ``torchrun`` (an initialised process group) call it on every rank with that
        rank's share of the meta-batch: the gradients of Φ and θ are averaged over all ranks'
        tasks before the one outer step, so N ranks with B/N tasks each follow the trajectory
        of one process with B tasks, and the result reports all of them.

        Divergence raises :class:`~mtl_plugin.errors.NonFiniteLossError`, whose
        ``settings`` name the likely learning rate(s):

        * before any update: a task's inner loop ending with its support loss non-finite
          or above ``INNER_DIVERGENCE_FACTOR`` x max(its start, ln(ways)) (``inner_lr``);
          a query loss that is non-finite or above ``DIVERGENCE_FACTOR`` x ln(ways)
          (``inner_lr`` before the first outer step, then ``encoder_lr`` / ``head_lr``);
        * after the update: a value of Φ or θ non-finite, or the norm of either grown by
          more than ``STEP_GROWTH_LIMIT`` x in the step (its lr), or a non-finite
          batch-norm statistic. The update is then already applied.

        Args:
            tasks: the meta-batch (any iterable of tasks, read once, in order).
            on_task: called as ``on_task(task, query_logits, query_y)`` after each task.

        Returns:
            The meta-batch's mean query loss and accuracy, per task and normal/hard.

        Raises:
            NonFiniteLossError: as above.
            ValueError: ``tasks`` is empty, or a task of another shape.

        Example::

            result = learner.meta_train_step([taskset.sample() for _ in range(2)])
        """
        self.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, accuracies, hard = [], [], []
        stopped = None
        try:
            for group in _task_groups(tasks, self.speedups.batch_tasks):
                parsed = [_support_query(task, self.config.shots) for task in group]
                results = self._task_losses(parsed)
                values = [loss.item() for loss, _ in results]
                for number, (value, (_, logits)) in enumerate(zip(values, results), start=len(losses) + 1):
                    if not math.isfinite(value) or value > DIVERGENCE_FACTOR * math.log(logits.shape[1]):
                        raise NonFiniteLossError(f"the query loss of task {number} of the meta-batch is "
                                                 f"{value:.3g}", settings=self._blame(("inner_lr",)))
                # One backward per group frees its graph before the next group is encoded.
                sum(loss for loss, _ in results).backward()
                for task, (_, _, _, query_y), value, (_, logits) in zip(group, parsed, values, results):
                    query_y = query_y.to(self.device)
                    losses.append(value)
                    accuracies.append(100.0 * (logits.argmax(dim=1) == query_y).float().mean().item())
                    hard.append(bool(getattr(task, "hard", False)))
                    if on_task is not None:
                        on_task(task, logits.detach(), query_y)
        except NonFiniteLossError as error:
            self.optimizer.zero_grad(set_to_none=True)
            stopped = error
        # Under torchrun a divergence on one rank stops every rank, before the gradients are summed.
        distributed.raise_if_any(stopped)
        if not losses:
            raise ValueError("tasks is empty: a meta-batch needs at least one task")
        distributed.all_reduce_gradients(self.meta_parameters(), len(losses))
        before = self._group_norms()
        self.optimizer.step()
        if distributed.world_size() > 1:
            distributed.broadcast_buffers(self.encoder)
            # Every rank reports the whole meta-batch: its tasks in rank order.
            losses, accuracies, hard = (distributed.all_gather(values) for values in (losses, accuracies, hard))
        self._check_step(before)
        return MetaStepResult(_mean(losses), _mean(accuracies), len(losses), accuracies, hard)

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
