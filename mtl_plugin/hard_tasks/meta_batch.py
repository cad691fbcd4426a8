"""Meta-batches of k normal tasks, then k' hard tasks drawn from the failures recorded in them.

Example::

    sampler = HardTaskMetaBatch.from_taskset(tasksets.train, k=2, seed=0)
    for task in range(4):                      # 2 normal tasks, then 2 hard ones made of their failures
        batch = sampler.sample()               # in place of tasksets.train.sample()
        ...
        record_task(batch, query_logits, query_labels)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import learn2learn as l2l
import torch

from mtl_plugin.hard_tasks.tracker import ClassAccuracyTracker, TaskAccuracy, task_classes
from mtl_plugin.hard_tasks.transform import HardTaskTransform
from mtl_plugin.tasks import RandomLike, as_random
from mtl_plugin.utils import distributed

__all__ = ["HardTaskMetaBatch", "MetaBatch", "SampledTask", "record_task"]


@dataclass
class SampledTask:
    """One loaded task with what the hard-task meta-batch needs to know about it.

    ``classes[j]`` is the data-set label of task label ``j``; ``indices[i]`` is the
    data-set index of ``data[i]``; ``hard`` says whether it is a hard task. It unpacks
    like a learn2learn task, ``data, labels = task``, so a loop written for learn2learn
    takes it unchanged, and :meth:`record` hands the query results of a normal task to
    the tracker of the :class:`HardTaskMetaBatch` that drew it.

    Example::

        data, labels = task
        (xs, ys), (xq, yq) = split_support_query(data, labels, shots=1)
        logits = model(xs, ys, xq)
        task.record(logits, yq)
    """

    data: torch.Tensor
    labels: torch.Tensor
    classes: tuple
    indices: tuple
    hard: bool = False
    tracker: ClassAccuracyTracker | None = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.data
        yield self.labels

    def record(self, logits: torch.Tensor, query_labels: torch.Tensor) -> TaskAccuracy | None:
        """Record a normal task's query logits (or predictions) in its tracker; a hard task is not recorded.

        Args:
            logits: ``(queries, ways)`` query logits, or ``(queries,)`` predicted labels.
            query_labels: the query targets ``0..ways-1``.

        Returns:
            The task's per-class accuracies and failure class; ``None`` for a hard task.

        Raises:
            ValueError: the task was not drawn by a :class:`HardTaskMetaBatch` (no tracker).

        Example::

            for task in meta_batch:
                ...
                task.record(query_logits, query_labels)
        """
        if self.hard:
            return None
        if self.tracker is None:
            raise ValueError(
                "this task has no tracker (it was not drawn by a HardTaskMetaBatch): "
                "call tracker.record(task.classes, logits, query_labels, indices=task.indices)"
            )
        return self.tracker.record(self.classes, logits, query_labels, indices=self.indices)


def record_task(task: Any, logits: torch.Tensor, query_labels: torch.Tensor) -> TaskAccuracy | None:
    """Record a task's query results for the hard-task meta-batch; any other task is left alone.

    One line in a learn2learn ``fast_adapt``, where the query logits and labels are at hand,
    without changing what it returns: a normal task a :class:`HardTaskMetaBatch` drew is
    recorded in its tracker, while a hard task and a plain learn2learn task (``tasksets.test``'s,
    say) are not, so the same ``fast_adapt`` serves every split.

    Args:
        task: the ``batch`` ``fast_adapt`` got: a :class:`SampledTask`, or any other task.
        logits: ``(queries, ways)`` query logits, or ``(queries,)`` predicted labels (detached here).
        query_labels: the query targets ``0..ways-1``.

    Returns:
        The task's per-class accuracies and failure class; ``None`` for a task that is not recorded.

    Raises:
        ValueError: the logits or labels do not fit the task (see :meth:`ClassAccuracyTracker.record`).

    Example::

        predictions = learner(evaluation_data)
        record_task(batch, predictions, evaluation_labels)
        return loss(predictions, evaluation_labels), accuracy(predictions, evaluation_labels)
    """
    if not isinstance(task, SampledTask):
        return None
    return task.record(logits, query_labels)


def _load(taskset: l2l.data.Taskset, description, hard: bool, tracker: ClassAccuracyTracker) -> SampledTask:
    data, labels = taskset.get_task(description)
    return SampledTask(
        data=data,
        labels=labels,
        classes=task_classes(taskset.dataset, description, labels),
        indices=tuple(dd.index for dd in description),
        hard=hard,
        tracker=tracker,
    )


@dataclass
class MetaBatch:
    """``k`` normal tasks, then ``k'`` hard tasks drawn only once the normal ones are recorded.

    Iterating yields the normal tasks, then draws and yields the hard ones, so a
    loop that records each normal task as it goes sees hard tasks made from them.

    Example::

        for task in meta_batch:
            ...
            if not task.hard:
                tracker.record(task.classes, logits, yq, indices=task.indices)
    """

    normal: list
    _sampler: HardTaskMetaBatch = field(repr=False)
    _hard: list | None = field(default=None, repr=False)

    def hard(self) -> list:
        """The ``k'`` hard tasks; the first call draws them from the failures recorded so far."""
        if self._hard is None:
            self._hard = self._sampler._draw_hard()
        return self._hard

    def __iter__(self) -> Iterator[SampledTask]:
        yield from self.normal
        yield from self.hard()

    def groups(self) -> Iterator[list]:
        """The normal tasks, then the hard ones (drawn on reaching them): what a learner may encode together."""
        yield self.normal
        yield self.hard()


class HardTaskMetaBatch:
    """Meta-batches of ``k`` normal tasks followed by ``k_hard`` hard tasks (Algorithm 2).

    A meta-batch holds ``k + k_hard`` tasks but only ``k`` fresh ones: its hard tasks are
    drawn again from the classes its normal tasks failed. Keeping a loop's meta-batch of
    ``N`` tasks (``k = k_hard = N // 2``) halves the fresh tasks per step; ``k = N`` keeps
    ``N`` fresh tasks at twice the tasks per step.

    :meth:`sample` hands the tasks over one at a time, as ``Taskset.sample()`` does, so that
    it replaces ``tasksets.train.sample()`` in a learn2learn loop: ``k`` normal tasks, then
    ``k_hard`` hard ones, then the next meta-batch; record each normal task
    (:func:`record_task`) before its first hard task is drawn. :meth:`sample_meta_batch` and
    iteration give whole :class:`MetaBatch` objects instead.

    ``tasks`` is an ordinary ``Taskset``; ``hard_tasks`` a ``Taskset`` whose
    transforms contain a :class:`HardTaskTransform` (its tracker is the one used
    here). All task descriptions are drawn in the main process, which is where the
    tracker lives. A normal ``Taskset`` with ``num_tasks > 0`` gives a fixed pool of
    that many tasks (task index drawn with ``seed``; the pool is the sampler's own,
    learn2learn's cache is left alone); the hard ``Taskset``'s cache is always
    bypassed, so hard tasks are never stale. Record every normal task before the
    hard ones are drawn (iterating a :class:`MetaBatch` does it in that order), and
    finish a meta-batch before asking for the next: :meth:`sample_meta_batch` starts a
    new meta-batch in the tracker. Under ``torchrun`` each rank draws its own share of the
    meta-batch (seed it per rank); the failures recorded on every rank are gathered to all
    ranks before the hard tasks are drawn.

    Example::

        sampler = HardTaskMetaBatch(normal_tasks, hard_tasks, k=2, seed=0)
        for meta_batch in itertools.islice(sampler, 1000):
            for task in meta_batch:
                ...  # train; record normal tasks with record_task(task, logits, labels)
    """

    def __init__(
        self,
        tasks: l2l.data.Taskset,
        hard_tasks: l2l.data.Taskset,
        k: int,
        k_hard: int | None = None,
        seed: RandomLike = None,
    ):
        k_hard = k if k_hard is None else k_hard
        if k < 1:
            raise ValueError(f"k={k} must be >= 1: the hard tasks are made from the normal tasks' failures")
        if k_hard < 0:
            raise ValueError(f"k_hard={k_hard} must be >= 0 (0 gives plain meta-batches)")
        transforms = hard_tasks.task_transforms
        if not isinstance(transforms, (list, tuple)):
            transforms = []
        hard = [t for t in transforms if isinstance(t, HardTaskTransform)]
        if len(hard) != 1:
            raise ValueError(
                f"hard_tasks has {len(hard)} HardTaskTransform in its task_transforms: give it exactly one, "
                f"in place of NWays"
            )
        self.tasks = tasks
        self.hard_tasks = hard_tasks
        self.tracker = hard[0].tracker
        self.k = k
        self.k_hard = k_hard
        self.rng = as_random(seed)
        # The fixed pool of a normal Taskset with num_tasks > 0, by task index.
        self._pool: dict[int, list] = {}
        # The rest of the meta-batch sample() is handing over, one task at a time.
        self._stream: Iterator[SampledTask] = iter(())

    @classmethod
    def from_taskset(
        cls,
        tasks: l2l.data.Taskset,
        k: int,
        k_hard: int | None = None,
        mode: str = "resample",
        history_decay: float | None = 0.9,
        seed: RandomLike = None,
    ) -> HardTaskMetaBatch:
        """The hard-task meta-batch of an ordinary ``Taskset``, its tracker and hard ``Taskset`` built for you.

        The hard tasks take the normal tasks' transforms with the first (``NWays``, ours or
        learn2learn's: anything with an ``n``) replaced by a :class:`HardTaskTransform` of as many ways.

        Args:
            tasks: the normal tasks; the first of its ``task_transforms`` draws the classes.
            k: normal tasks per meta-batch.
            k_hard: hard tasks per meta-batch (default ``k``).
            mode: ``"resample"`` (new images of the failure classes) or ``"reuse"`` (the failed images).
            history_decay: how long failures count across meta-batches (see :class:`ClassAccuracyTracker`).
            seed: fixes the hard classes and the draw of cached normal tasks.

        Returns:
            The sampler; ``sampler.tracker`` records the normal tasks (or call ``task.record``).

        Raises:
            ValueError: the first transform of ``tasks`` has no ``n`` (number of ways), or a bad ``k``.

        Example::

            sampler = HardTaskMetaBatch.from_taskset(tasksets.train, k=2, seed=0)
            batch = sampler.sample()               # in place of tasksets.train.sample()
        """
        transforms = list(tasks.task_transforms or [])
        ways = getattr(transforms[0], "n", None) if transforms else None
        if not isinstance(ways, int):
            raise ValueError(
                "the first of tasks.task_transforms must draw the classes (NWays, with its n): "
                "build the hard Taskset yourself with a HardTaskTransform in its place"
            )
        rng = as_random(seed)
        tracker = ClassAccuracyTracker(tasks.dataset, seed=rng, history_decay=history_decay)
        first = HardTaskTransform(tasks.dataset, n=ways, tracker=tracker, mode=mode, seed=rng)
        hard_tasks = l2l.data.Taskset(tasks.dataset, task_transforms=[first, *transforms[1:]])
        return cls(tasks, hard_tasks, k, k_hard, seed=rng)

    def sample(self) -> SampledTask:
        """The next task, as ``Taskset.sample()`` gives one: ``k`` normal tasks, then ``k_hard`` hard ones.

        The first call of each meta-batch starts it in the tracker (as :meth:`sample_meta_batch`);
        the first hard task is drawn once every normal task of the meta-batch is recorded.

        Returns:
            A :class:`SampledTask`, which unpacks as ``data, labels``.

        Raises:
            RuntimeError: a hard task is due but fewer than ``k`` normal tasks were recorded.

        Example::

            for task in range(meta_batch_size):    # meta_batch_size = k + k_hard
                batch = sampler.sample()
                ...  # fast_adapt calls record_task(batch, predictions, labels)
        """
        task = next(self._stream, None)
        if task is None:
            self._stream = iter(self.sample_meta_batch())
            task = next(self._stream)
        return task

    def sample_meta_batch(self) -> MetaBatch:
        """Start a new meta-batch in the tracker and draw its ``k`` normal tasks.

        Ends the meta-batch :meth:`sample` was handing over: its next call starts a new one.

        Example::

            for task in sampler.sample_meta_batch():
                ...
        """
        self.tracker.start_meta_batch()
        self._stream = iter(())
        return MetaBatch([self._draw_normal() for _ in range(self.k)], self)

    def __iter__(self) -> Iterator[MetaBatch]:
        while True:
            yield self.sample_meta_batch()

    def _draw_normal(self) -> SampledTask:
        if self.tasks.num_tasks == -1:
            return _load(self.tasks, self.tasks.sample_task_description(), hard=False, tracker=self.tracker)
        i = self.rng.randrange(self.tasks.num_tasks)
        if i not in self._pool:
            self._pool[i] = self.tasks.sample_task_description()
        return _load(self.tasks, self._pool[i], hard=False, tracker=self.tracker)

    def _draw_hard(self) -> list:
        recorded = len(self.tracker.failures)
        if recorded < self.k:
            raise RuntimeError(
                f"only {recorded} of the {self.k} normal tasks were recorded before drawing hard tasks: "
                f"call record_task(task, query_logits, query_labels) (or task.record) after each normal task"
            )
        if distributed.world_size() > 1:
            # Under torchrun every rank draws its hard tasks from the failures of every rank's
            # normal tasks (in rank order), so all ranks keep the same failures and history.
            self.tracker.failures = distributed.all_gather(self.tracker.failures)
            self.tracker.version += 1
        return [
            _load(self.hard_tasks, self.hard_tasks.sample_task_description(), hard=True, tracker=self.tracker)
            for _ in range(self.k_hard)
        ]
