"""The outer loop of meta-transfer learning: Adam on Φ and θ, its lr schedule, divergence checks, averaging.

:class:`~mtl_plugin.meta_transfer.MetaTransferLearner` is the method (Φ, θ, the head's
initialisation, ``adapt``, ``task_loss``, ``predict``) and holds no optimiser, so that a
learn2learn-style script can drive it with its own (see ``examples/own_loop.py``).
:class:`MetaTrainer` is this package's own driver: the paper's Adam at ``encoder_lr`` and
``head_lr`` with a step schedule, one outer step per meta-batch with every divergence
check, and under ``torchrun`` the meta-gradients averaged over all ranks.
:func:`~mtl_plugin.training.meta_training.meta_train` runs it for a whole run.

Example::

    trainer = MetaTrainer(learner)
    for iteration in range(1000):
        result = trainer.step([taskset.sample() for _ in range(2)])
        trainer.scheduler.step()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mtl_plugin.errors import NonFiniteLossError
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.tasks import split_support_query
from mtl_plugin.training.run_log import DIVERGENCE_FACTOR, all_finite, fast_forward
from mtl_plugin.utils import distributed

if TYPE_CHECKING:
    from mtl_plugin.meta_transfer import MetaTransferLearner

__all__ = ["STEP_GROWTH_LIMIT", "MetaStepResult", "MetaTrainer"]

# Adam moves each weight by about its lr per step: a step that multiplies the norm of Φ or θ
# by ten comes from an lr far above the weights' own scale, not from learning.
STEP_GROWTH_LIMIT = 10.0
_WHAT = {"encoder_lr": "Φ (the encoder's trainable weights)", "head_lr": "θ (the head's initialisation)"}


@dataclass
class MetaStepResult:
    """Mean query loss and accuracy (%) of one meta-batch, its number of tasks, and each task's accuracy.

    ``task_accuracies[i]`` is the query accuracy (%) of the i-th task and
    ``hard[i]`` whether it was a hard task (a task with a true ``hard`` attribute).

    Example::

        result = trainer.step(tasks)
        print(result.loss, result.accuracy, result.normal_accuracy, result.hard_accuracy)
    """

    loss: float
    accuracy: float
    tasks: int
    task_accuracies: list[float] = field(default_factory=list)
    hard: list[bool] = field(default_factory=list)

    @property
    def normal_accuracy(self) -> float:
        """Mean query accuracy (%) of the normal tasks; NaN if there were none."""
        return _mean([a for a, hard in zip(self.task_accuracies, self.hard) if not hard])

    @property
    def hard_accuracy(self) -> float:
        """Mean query accuracy (%) of the hard tasks; NaN if there were none."""
        return _mean([a for a, hard in zip(self.task_accuracies, self.hard) if hard])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _support_query(task: Any, shots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


class MetaTrainer:
    """Adam over a learner's :meth:`~mtl_plugin.meta_transfer.MetaTransferLearner.parameter_groups`,
    its step schedule, and the checked outer step.

    ``optimizer`` and ``scheduler`` are plain torch objects: their ``state_dict()`` is what
    ``last.pt`` stores. ``lr_names`` names each optimiser group's config field
    (``"encoder_lr"`` when the encoder has trainable weights, then ``"head_lr"``).

    Args:
        learner: the learner whose Φ and θ this trainer updates.
        config: the run's settings: the lrs, their schedule, the shots that split a
            ``(data, labels)`` task. Default: the learner's ``config`` if it is a
            :class:`~mtl_plugin.meta_config.MetaTrainConfig`, else the paper's loop around
            the learner's method settings.

    Example::

        trainer = MetaTrainer(learner, MetaTrainConfig(shots=1))
        result = trainer.step([taskset.sample(), taskset.sample()])
        trainer.scheduler.step()
    """

    def __init__(self, learner: MetaTransferLearner, config: MetaTrainConfig | None = None):
        self.learner = learner
        if config is None:
            config = learner.config
            if not isinstance(config, MetaTrainConfig):
                config = MetaTrainConfig(**asdict(config))
        self.config = config
        self.optimizer = torch.optim.Adam(learner.parameter_groups())
        self.lr_names = ["encoder_lr"] * (len(self.optimizer.param_groups) - 1) + ["head_lr"]
        self.apply_learning_rates()

    def apply_learning_rates(self, steps: int = 0) -> None:
        """Put ``config.encoder_lr`` and ``config.head_lr`` into the optimiser and rebuild its step schedule.

        The schedule is brought to ``steps`` outer steps, so that a resumed run continues
        under the config's lrs from where it was; with the saved lrs this gives the very lrs
        of an uninterrupted run.

        Args:
            steps: the outer steps already taken (the saved scheduler's ``last_epoch``).

        Example::

            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.apply_learning_rates(state["scheduler"]["last_epoch"])
        """
        config = self.config
        for group, name in zip(self.optimizer.param_groups, self.lr_names):
            group.update(lr=getattr(config, name), initial_lr=getattr(config, name))
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.lr_step, gamma=config.lr_gamma
        )
        fast_forward(self.scheduler, steps)

    def suspects(self, unmoved: tuple[str, ...]) -> tuple[str, ...]:
        """The lrs to blame for a loss or weight gone wrong: Φ's and θ's once Adam has moved them, else ``unmoved``.

        Args:
            unmoved: the suspects before the first outer step: the inner lr, or nothing (the data).

        Returns:
            Config field names, most likely first.

        Example::

            raise NonFiniteLossError("a weight is nan", settings=trainer.suspects(()))
        """
        return tuple(dict.fromkeys(self.lr_names)) if self.optimizer.state else unmoved

    def blame(self, error: NonFiniteLossError) -> NonFiniteLossError:
        """``error``, blaming the outer lrs if it names no setting and the outer loop has moved Φ and θ.

        The learner cannot tell whether non-finite features or θ come from the data or from
        the outer steps; this trainer can.

        Args:
            error: a divergence raised by the learner (e.g. by ``predict`` at validation).

        Returns:
            ``error`` itself, or a copy with ``settings`` naming ``encoder_lr`` / ``head_lr``.

        Example::

            except NonFiniteLossError as error:
                raise trainer.blame(error)
        """
        if error.settings or not self.optimizer.state:
            return error
        return NonFiniteLossError(str(error), settings=self.suspects(()))

    def _group_norms(self) -> torch.Tensor:
        return torch.stack(
            [
                torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in g["params"]]))
                for g in self.optimizer.param_groups
            ]
        )

    def _check_step(self, before: torch.Tensor) -> None:
        """Raise if the outer step just taken made Φ or θ non-finite, or blew their norm up."""
        after = self._group_norms()
        for (old, new), name in zip(torch.stack([before, after], dim=1).tolist(), self.lr_names):
            if not math.isfinite(new):
                raise NonFiniteLossError(f"a value of {_WHAT[name]} became NaN or infinite", settings=(name,))
            if new > STEP_GROWTH_LIMIT * old > 0:
                raise NonFiniteLossError(
                    f"the norm of {_WHAT[name]} went from {old:.3g} to {new:.3g} in one step", settings=(name,)
                )
        # Batch-norm statistics that train (scratch encoders, bn="train") are checked too.
        if not all_finite(self.learner.encoder.buffers()):
            raise NonFiniteLossError("a batch-norm statistic became NaN or infinite", settings=self.suspects(()))

    def step(
        self,
        tasks: Iterable,
        on_task: Callable[[Any, torch.Tensor, torch.Tensor], None] | None = None,
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
          or above :data:`~mtl_plugin.heads.INNER_DIVERGENCE_FACTOR` x max(its start, ln(ways))
          (``inner_lr``);
          a query loss that is non-finite or above ``DIVERGENCE_FACTOR`` x ln(ways)
          (``inner_lr`` before the first outer step, then ``encoder_lr`` / ``head_lr``);
        * after the update: a value of Φ or θ non-finite, or the norm of either grown by
          more than ``STEP_GROWTH_LIMIT`` x in the step (its lr), or a non-finite
          batch-norm statistic. The update is then already applied.

        The schedule is not stepped: the caller steps ``scheduler`` once per meta-batch.

        Args:
            tasks: the meta-batch (any iterable of tasks, read once, in order).
            on_task: called as ``on_task(task, query_logits, query_y)`` after each task.

        Returns:
            The meta-batch's mean query loss and accuracy, per task and normal/hard.

        Raises:
            NonFiniteLossError: as above.
            ValueError: ``tasks`` is empty, or a task of another shape.

        Example::

            result = trainer.step([taskset.sample() for _ in range(2)])
        """
        learner = self.learner
        learner.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, accuracies, hard = [], [], []
        stopped = None
        try:
            for group in _task_groups(tasks, learner.speedups.batch_tasks):
                parsed = [_support_query(task, self.config.shots) for task in group]
                results = learner.task_losses(parsed)
                values = [loss.item() for loss, _ in results]
                for number, (value, (_, logits)) in enumerate(zip(values, results), start=len(losses) + 1):
                    if not math.isfinite(value) or value > DIVERGENCE_FACTOR * math.log(logits.shape[1]):
                        raise NonFiniteLossError(
                            f"the query loss of task {number} of the meta-batch is {value:.3g}",
                            settings=self.suspects(("inner_lr",)),
                        )
                # One backward per group frees its graph before the next group is encoded.
                sum(loss for loss, _ in results).backward()
                for task, (_, _, _, query_y), value, (_, logits) in zip(group, parsed, values, results):
                    query_y = query_y.to(learner.device)
                    losses.append(value)
                    accuracies.append(100.0 * (logits.argmax(dim=1) == query_y).float().mean().item())
                    hard.append(bool(getattr(task, "hard", False)))
                    if on_task is not None:
                        on_task(task, logits.detach(), query_y)
        except NonFiniteLossError as error:
            self.optimizer.zero_grad(set_to_none=True)
            stopped = self.blame(error)
        # Under torchrun a divergence on one rank stops every rank, before the gradients are summed.
        distributed.raise_if_any(stopped)
        if not losses:
            raise ValueError("tasks is empty: a meta-batch needs at least one task")
        distributed.all_reduce_gradients(learner.meta_parameters(), len(losses))
        before = self._group_norms()
        self.optimizer.step()
        if distributed.world_size() > 1:
            distributed.broadcast_buffers(learner.encoder)
            # Every rank reports the whole meta-batch: its tasks in rank order.
            losses, accuracies, hard = (distributed.all_gather(values) for values in (losses, accuracies, hard))
        self._check_step(before)
        return MetaStepResult(_mean(losses), _mean(accuracies), len(losses), accuracies, hard)
