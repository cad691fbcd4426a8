"""The hard-task (HT) meta-batch of Sun et al. (CVPR 2019) for learn2learn ``Taskset``s.

Each meta-batch holds ``k`` normal tasks, then ``k'`` hard tasks built from the
classes the model got most wrong in those ``k`` tasks (Algorithm 2 of the paper):

* :class:`ClassAccuracyTracker` records, after each normal task, every class's
  query accuracy and the task's *failure class* (its lowest-accuracy class, ties
  broken by the lowest logit margin), and keeps a decaying history of failures
  across meta-batches;
* :class:`HardTaskTransform` is a task transform that replaces ``NWays`` in a
  ``Taskset`` and builds N-way tasks from failure classes only, as soon as N of
  them are known: this meta-batch's, then the most-failed of the history;
* :class:`HardTaskMetaBatch` draws the meta-batches from a normal and a hard
  ``Taskset`` and hands every task over with its data-set classes and indices.

The tracker's state lives in the main process. Hard tasks must therefore be built
there: :class:`HardTaskMetaBatch` draws every task description itself (no
``DataLoader``), and :class:`HardTaskTransform` raises when it runs in a
``DataLoader`` worker, whose copy of the tracker never sees new failures. A hard
``Taskset`` may be read through a ``DataLoader`` with ``num_workers=0``.
learn2learn caches task descriptions when ``num_tasks > 0``: ``HardTaskMetaBatch``
bypasses that cache, and a hard task loaded from it after the tracker changed
raises instead of silently repeating old failure classes.

Example::

    tracker = ClassAccuracyTracker(md, seed=0)
    hard = Taskset(md, [HardTaskTransform(md, n=5, tracker=tracker, seed=0),
                        KShots(md, k=16, seed=0), LoadData(md), RemapLabels(md, seed=0)])
    for meta_batch in itertools.islice(HardTaskMetaBatch(normal, hard, k=2, seed=0), 1000):
        for task in meta_batch:  # 2 normal tasks, then 2 hard tasks drawn after they are recorded
            ...  # adapt on the support set, compute query logits, meta-update
            if not task.hard:
                tracker.record(task.classes, query_logits, query_labels, indices=task.indices)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Hashable, Iterator, Optional, Sequence

import learn2learn as l2l
import torch
from learn2learn.data.task_dataset import DataDescription
from torch.utils.data import get_worker_info

from mtl_plugin import distributed
from mtl_plugin.tasks import NWays, RandomLike, as_random

__all__ = [
    "ClassAccuracyTracker",
    "HardTaskMetaBatch",
    "HardTaskTransform",
    "MetaBatch",
    "SampledTask",
    "TaskAccuracy",
    "task_classes",
]

MODES = ("resample", "reuse")


def _as_label_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return [v.item() if isinstance(v, torch.Tensor) else v for v in values]


def task_classes(dataset: l2l.data.MetaDataset, description: Sequence[DataDescription], labels: torch.Tensor) -> tuple:
    """The data-set label of each task label: ``classes[j]`` is the class that label ``j`` stands for.

    Works with any label remapping, including none.

    Args:
        dataset: the ``MetaDataset`` the task was drawn from.
        description: the task description a ``Taskset`` built.
        labels: the (remapped) labels ``taskset.get_task(description)`` loaded from it, in the same order.

    Returns:
        ``classes``, one data-set label per task label ``0..n-1``.

    Raises:
        ValueError: ``labels`` and ``description`` differ in length, or one task label stands
            for two classes.

    Example::

        description = taskset.sample_task_description()
        x, y = taskset.get_task(description)
        classes = task_classes(meta_dataset, description, y)
        tracker.record(classes, query_logits, query_y)
    """
    labels = _as_label_list(labels)
    if len(labels) != len(description):
        raise ValueError(
            f"labels has {len(labels)} entries but the description {len(description)}: pass the labels "
            f"that taskset.get_task(description) returned"
        )
    mapping: dict = {}
    for dd, label in zip(description, labels):
        original = dataset.indices_to_labels[dd.index]
        if mapping.setdefault(label, original) != original:
            raise ValueError(
                f"task label {label!r} stands for both class {mapping[label]!r} and {original!r}: "
                f"labels do not match the description"
            )
    expected = list(range(len(mapping)))
    if sorted(mapping) != expected:
        raise ValueError(
            f"task labels {sorted(mapping)} are not 0..{len(mapping) - 1}: "
            f"end the transforms with RemapLabels"
        )
    return tuple(mapping[j] for j in expected)


@dataclass(frozen=True)
class TaskAccuracy:
    """What :meth:`ClassAccuracyTracker.record` learned from one task.

    ``accuracies`` maps each data-set class with query samples to its query
    accuracy; ``margins`` (``None`` when ``record`` got predicted labels, not
    logits) to the mean over its queries of the true-class logit minus the best
    other logit; ``failure`` is the lowest-accuracy class, ties broken by the
    lowest margin; ``failure_indices`` are the data-set indices of the failure
    class's images in the task (``None`` when ``record`` was given no indices).

    Example::

        result = tracker.record(classes, logits, targets)
        print(result.failure, result.accuracies[result.failure], result.margins[result.failure])
    """

    accuracies: dict
    failure: Hashable
    failure_indices: Optional[tuple] = None
    margins: Optional[dict] = None

    def rank(self, label: Hashable) -> tuple:
        """How badly ``label`` did, lowest first when sorted: its accuracy, then its margin (inf if unknown)."""
        return self.accuracies[label], math.inf if self.margins is None else self.margins[label]


class ClassAccuracyTracker:
    """Per-class query accuracy of the meta-train tasks and the failure class of each.

    Call :meth:`record` after each normal meta-train task with the task's data-set
    classes in remapped-label order (``classes[j]`` is the data-set label of task
    label ``j``: :attr:`SampledTask.classes`, or :func:`task_classes`), the query
    predictions (labels of shape ``(q,)`` or logits of shape ``(q, n)``), the query
    targets (task labels) and, for ``mode="reuse"``, the data-set indices of the
    task's samples (:attr:`SampledTask.indices`). Call :meth:`start_meta_batch`
    before each meta-batch (:class:`HardTaskMetaBatch` does).

    Logits are better than labels: two classes at the same accuracy (often both
    100%) are told apart by their mean margin (true-class logit minus the best
    other one), so the failure class is the one the model was least sure of; the
    seeded generator breaks ties only when predicted labels are given.

    With ``history_decay`` (default 0.9; ``None`` keeps no history) each failure
    class keeps a score, multiplied by ``history_decay`` every meta-batch and
    raised by the error rate (1 - accuracy) of each of its failures; hard tasks
    fill up from the highest scores. A meta-batch of k normal tasks yields at
    most k failure classes, fewer than the N ways of a hard task when k < N: the
    history is what makes N failure classes exist. At 0.9 a failure's weight
    halves in about 6.6 meta-batches, so within a few meta-batches N classes are
    remembered (up to k new ones per meta-batch), while a class the model has
    since learned sinks below the newer failures within a few dozen.

    Example::

        tracker = ClassAccuracyTracker(meta_dataset, seed=0)
        tracker.start_meta_batch()
        result = tracker.record((12, 3, 40, 7, 21), query_logits, query_y)
        tracker.failure_classes  # [result.failure]
        checkpoint["tracker"] = tracker.state_dict()  # resume with tracker.load_state_dict(...)
    """

    def __init__(
        self,
        dataset: l2l.data.MetaDataset,
        seed: RandomLike = None,
        history_decay: Optional[float] = 0.9,
    ):
        if history_decay is not None and not 0.0 <= history_decay < 1.0:
            raise ValueError(f"history_decay={history_decay} must be in [0, 1), or None to keep no history")
        self.dataset = dataset
        self.labels = frozenset(dataset.labels)
        self.history_decay = history_decay
        self.rng = as_random(seed)
        self.failures: list[TaskAccuracy] = []  # of the current meta-batch, in recording order
        self.history: dict = {}
        # The margin of each history class's latest failure: it orders equal scores.
        self.history_margins: dict = {}
        # Bumped on every change so that a cached hard task can tell it is stale.
        self.version = 0

    @property
    def failure_classes(self) -> list:
        """The failure class of each task recorded in the current meta-batch (repeats kept)."""
        return [failure.failure for failure in self.failures]

    def start_meta_batch(self) -> None:
        """Forget the current failures, folding them into the history when one is kept."""
        if self.history_decay is not None:
            self.history = {label: score * self.history_decay for label, score in self.history.items()}
            for failure in self.failures:
                error = 1.0 - failure.accuracies[failure.failure]
                self.history[failure.failure] = self.history.get(failure.failure, 0.0) + error
                self.history_margins[failure.failure] = failure.rank(failure.failure)[1]
            self.history = {label: score for label, score in self.history.items() if score > 1e-6}
            self.history_margins = {label: m for label, m in self.history_margins.items() if label in self.history}
        self.failures = []
        self.version += 1

    def history_order(self) -> list:
        """The history's classes, most-failed first: descending score, then lowest margin.

        Example::

            tracker.history_order()[:5]  # the classes a hard task fills up from first
        """
        return sorted(self.history, key=lambda label: (-self.history[label], self.history_margins[label], repr(label)))

    def state_dict(self) -> dict:
        """The tracker's state in plain Python types, for a checkpoint (``torch.save`` with weights_only)."""
        return {
            "failures": [(f.accuracies, f.failure, f.failure_indices, f.margins) for f in self.failures],
            "history": dict(self.history),
            "history_margins": dict(self.history_margins),
            "version": self.version,
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output, e.g. when a run resumes from a checkpoint."""
        self.failures = [
            TaskAccuracy(dict(acc), failure, indices, None if margins is None else dict(margins))
            for acc, failure, indices, margins in state["failures"]
        ]
        self.history = dict(state["history"])
        self.history_margins = dict(state["history_margins"])
        self.version = state["version"]
        self.rng.setstate(state["rng"])

    def record(
        self,
        classes: Sequence,
        predictions_or_logits: torch.Tensor,
        targets: torch.Tensor,
        indices: Optional[Sequence[int]] = None,
    ) -> TaskAccuracy:
        """Store each class's query accuracy (and margin, given logits) in one task; return them and the failure.

        Args:
            classes: the data-set label of each task label (``SampledTask.classes`` or :func:`task_classes`).
            predictions_or_logits: ``(queries, ways)`` query logits (margins break ties between
                classes of equal accuracy) or ``(queries,)`` predicted labels.
            targets: the query labels ``0..ways-1``.
            indices: the data-set index of each image of the task, for ``mode="reuse"``.

        Returns:
            The task's per-class accuracies, margins and failure class.

        Raises:
            ValueError: classes that are not labels of the tracker's data set, duplicated, or
                logits whose columns do not match them.

        Example::

            tracker.record(task.classes, query_logits, query_y, indices=task.indices)
        """
        classes = _as_label_list(classes)
        unknown = [label for label in classes if label not in self.labels]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not labels of the tracker's data set: pass the data-set labels "
                f"of the task (SampledTask.classes or task_classes()), not the remapped 0..n-1"
            )
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes {classes} has duplicates: give one data-set label per task label")
        targets = torch.as_tensor(targets).long().reshape(-1)
        predictions = torch.as_tensor(predictions_or_logits).detach()
        logits = None
        if predictions.dim() == 2:
            if predictions.shape[1] != len(classes):
                raise ValueError(
                    f"logits have {predictions.shape[1]} columns for {len(classes)} classes: pass the "
                    f"query logits of this task (one column per entry of classes)"
                )
            logits = predictions.float()
            predictions = logits.argmax(dim=1)
        predictions = predictions.long().reshape(-1)
        if len(predictions) != len(targets):
            raise ValueError(
                f"{len(predictions)} predictions for {len(targets)} targets: pass the query logits "
                f"(or predicted labels) and the query labels of the same task"
            )
        if len(targets) == 0:
            raise ValueError("targets is empty: record the task's query samples")
        bad = targets[(targets < 0) | (targets >= len(classes))].unique().tolist()
        if bad:
            raise ValueError(f"targets {bad} are outside 0..{len(classes) - 1} (one per entry of classes)")

        accuracies = {}
        for j, label in enumerate(classes):
            members = targets == j
            if members.any():
                accuracies[label] = (predictions[members] == j).float().mean().item()
        margins = None if logits is None else self._margins(logits, targets, classes)
        scored = TaskAccuracy(accuracies, failure=None, margins=margins)
        lowest = min(map(scored.rank, accuracies))
        # Exact ties go to the seeded generator: with logits they (almost) never happen.
        failure = self.rng.choice([label for label in accuracies if scored.rank(label) == lowest])
        result = replace(scored, failure=failure, failure_indices=self._indices_of(failure, classes, indices))
        self.failures.append(result)
        self.version += 1
        return result

    @staticmethod
    def _margins(logits: torch.Tensor, targets: torch.Tensor, classes: list) -> dict:
        true = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        best_other = logits.scatter(1, targets.unsqueeze(1), -math.inf).max(dim=1).values
        margin = true - best_other
        return {label: margin[targets == j].mean().item() for j, label in enumerate(classes) if (targets == j).any()}

    def _indices_of(self, failure, classes: list, indices: Optional[Sequence[int]]) -> Optional[tuple]:
        if indices is None:
            return None
        chosen = []
        for index in _as_label_list(indices):
            label = self.dataset.indices_to_labels.get(index)
            if label not in classes:
                raise ValueError(
                    f"index {index!r} (class {label!r}) is not a sample of the task's classes {classes}: "
                    f"pass the data-set indices of the task (SampledTask.indices)"
                )
            if label == failure:
                chosen.append(index)
        return tuple(chosen)


class _FreshnessCheck:
    """Identity on a sample that raises if the tracker changed since the task was built."""

    def __init__(self, tracker: ClassAccuracyTracker):
        self.tracker = tracker
        self.version = tracker.version

    def __call__(self, data):
        if self.tracker.version != self.version:
            raise RuntimeError(
                "this hard task was built from failure classes the tracker has since replaced: the Taskset "
                "caches task descriptions (num_tasks > 0). Build the hard Taskset with num_tasks=-1, or "
                "draw hard tasks with HardTaskMetaBatch, which bypasses the cache"
            )
        return data


class HardTaskTransform:
    """A task transform, in place of ``NWays``, that picks the ``n`` classes from recent failures.

    ``mode="resample"`` (the variant the paper found better) keeps all images of
    the chosen failure classes for the next transform (``KShots``) to draw from;
    ``mode="reuse"`` keeps exactly the images the failure class had in its failed
    task (record them with ``tracker.record(..., indices=task.indices)``).

    The ``n`` classes are this meta-batch's failure classes, worst first (lowest
    accuracy, then lowest margin); with fewer than ``n`` of them, the task fills
    up from the tracker's history in :meth:`ClassAccuracyTracker.history_order`
    (most-failed first), and only once no scored class is left, uniformly at
    random from the other classes; never with duplicates. The choice is
    deterministic wherever the tracker got logits: the random draw only fills
    what no failure can. Fill-up classes get fresh images in both modes. A class
    that failed in several tasks reuses the images of its worst one. With no
    failure and no history it samples exactly like ``mtl_plugin.tasks.NWays``
    with the same generator. If a transform runs before it, only the classes and
    images of the incoming description are used.

    Example::

        tracker = ClassAccuracyTracker(md, seed=0)
        transforms = [HardTaskTransform(md, n=5, tracker=tracker, seed=0), KShots(md, k=16, seed=0),
                      LoadData(md), RemapLabels(md, seed=0)]
        hard_tasks = l2l.data.Taskset(md, transforms, num_tasks=-1)
    """

    def __init__(
        self,
        dataset: l2l.data.MetaDataset,
        n: int,
        tracker: ClassAccuracyTracker,
        mode: str = "resample",
        seed: RandomLike = None,
    ):
        labels = list(dataset.labels)
        if not 1 <= n <= len(labels):
            raise ValueError(
                f"n={n} must be between 1 and the number of classes in the data set ({len(labels)})"
            )
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        foreign = sorted(tracker.labels - set(labels), key=repr)
        if foreign:
            raise ValueError(
                f"the tracker knows classes {foreign[:5]} that this data set lacks: build the tracker "
                f"on the same data set as the transform"
            )
        self.dataset = dataset
        self.n = n
        self.tracker = tracker
        self.mode = mode
        self.rng = as_random(seed)
        self._nways = NWays(dataset, n, seed=self.rng)

    def __call__(self, description):
        if get_worker_info() is not None:
            raise RuntimeError(
                "HardTaskTransform ran in a DataLoader worker, whose copy of the tracker never sees new "
                "failures: load hard tasks with num_workers=0 or through HardTaskMetaBatch"
            )
        check = _FreshnessCheck(self.tracker)
        if not self.tracker.failures and not self.tracker.history:
            description = self._nways(description)
        else:
            description = self._hard_description(description)
        for dd in description:
            dd.transforms.insert(0, check)
        return description

    def _hard_description(self, description):
        if description is None:
            available = set(self.dataset.labels)
        else:
            available = {self.dataset.indices_to_labels[dd.index] for dd in description}
        if len(available) < self.n:
            raise ValueError(
                f"the incoming description has {len(available)} classes, fewer than n={self.n}: "
                f"filter fewer classes before HardTaskTransform"
            )
        by_failure = {}
        for failure in self.tracker.failures:
            if failure.failure in available:
                by_failure.setdefault(failure.failure, []).append(failure)
        chosen = self._choose_classes(by_failure, available)

        result = []
        for label in chosen:
            if self.mode == "reuse" and label in by_failure:
                result.extend(DataDescription(index) for index in self._failed_indices(by_failure[label]))
            elif description is None:
                result.extend(DataDescription(index) for index in self.dataset.labels_to_indices[label])
            else:
                result.extend(dd for dd in description if self.dataset.indices_to_labels[dd.index] == label)
        return result

    def _choose_classes(self, by_failure: dict, available: set) -> list:
        failed = sorted(by_failure, key=repr)
        if any(f.margins is None for failures in by_failure.values() for f in failures):
            # Without margins equally bad classes would always come in the same order: let them take turns.
            self.rng.shuffle(failed)
        failed.sort(key=lambda label: min(f.rank(label) for f in by_failure[label]))
        chosen = failed[: self.n]
        remembered = [label for label in self.tracker.history_order() if label in available and label not in chosen]
        chosen += remembered[: self.n - len(chosen)]
        others = sorted(available - set(chosen), key=repr)
        return chosen + self.rng.sample(others, k=self.n - len(chosen))

    @staticmethod
    def _failed_indices(failures: list) -> tuple:
        # The worst instance of a class that failed several times is the hardest to reuse.
        worst = min(failures, key=lambda f: f.rank(f.failure))
        if worst.failure_indices is None:
            raise ValueError(
                f"mode='reuse' needs the images of the failed task of class {worst.failure!r}: "
                f"call tracker.record(..., indices=task.indices)"
            )
        return worst.failure_indices


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
    tracker: Optional["ClassAccuracyTracker"] = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.data
        yield self.labels

    def record(self, logits: torch.Tensor, query_labels: torch.Tensor) -> Optional[TaskAccuracy]:
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
    _sampler: "HardTaskMetaBatch" = field(repr=False)
    _hard: Optional[list] = field(default=None, repr=False)

    def hard(self) -> list:
        """The ``k'`` hard tasks; the first call draws them from the failures recorded so far."""
        if self._hard is None:
            self._hard = self._sampler._draw_hard()
        return self._hard

    def __iter__(self) -> Iterator[SampledTask]:
        yield from self.normal
        yield from self.hard()


class HardTaskMetaBatch:
    """Meta-batches of ``k`` normal tasks followed by ``k_hard`` hard tasks (Algorithm 2).

    ``tasks`` is an ordinary ``Taskset``; ``hard_tasks`` a ``Taskset`` whose
    transforms contain a :class:`HardTaskTransform` (its tracker is the one used
    here). All task descriptions are drawn in the main process, which is where the
    tracker lives. A normal ``Taskset`` with ``num_tasks > 0`` gives a fixed pool of
    that many tasks (task index drawn with ``seed``; the pool is the sampler's own,
    learn2learn's cache is left alone); the hard ``Taskset``'s cache is always
    bypassed, so hard tasks are never stale. Record every normal task before the
    hard ones are drawn (iterating a :class:`MetaBatch` does it in that order), and
    finish a meta-batch before asking for the next: :meth:`sample` starts a new
    meta-batch in the tracker. Under ``torchrun`` each rank draws its own share of the
    meta-batch (seed it per rank); the failures recorded on every rank are gathered to all
    ranks before the hard tasks are drawn.

    Example::

        sampler = HardTaskMetaBatch(normal_tasks, hard_tasks, k=2, seed=0)
        for meta_batch in itertools.islice(sampler, 1000):
            for task in meta_batch:
                ...  # train; record normal tasks with sampler.tracker.record(...)
    """

    def __init__(
        self,
        tasks: l2l.data.Taskset,
        hard_tasks: l2l.data.Taskset,
        k: int,
        k_hard: Optional[int] = None,
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

    @classmethod
    def from_taskset(
        cls,
        tasks: l2l.data.Taskset,
        k: int,
        k_hard: Optional[int] = None,
        mode: str = "resample",
        history_decay: Optional[float] = 0.9,
        seed: RandomLike = None,
    ) -> "HardTaskMetaBatch":
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
            for task in sampler.sample():
                ...
                task.record(query_logits, query_labels)
        """
        transforms = list(tasks.task_transforms or [])
        ways = getattr(transforms[0], "n", None) if transforms else None
        if not isinstance(ways, int):
            raise ValueError("the first of tasks.task_transforms must draw the classes (NWays, with its n): "
                             "build the hard Taskset yourself with a HardTaskTransform in its place")
        rng = as_random(seed)
        tracker = ClassAccuracyTracker(tasks.dataset, seed=rng, history_decay=history_decay)
        first = HardTaskTransform(tasks.dataset, n=ways, tracker=tracker, mode=mode, seed=rng)
        hard_tasks = l2l.data.Taskset(tasks.dataset, task_transforms=[first, *transforms[1:]])
        return cls(tasks, hard_tasks, k, k_hard, seed=rng)

    def sample(self) -> MetaBatch:
        """Start a new meta-batch in the tracker and draw its ``k`` normal tasks."""
        self.tracker.start_meta_batch()
        return MetaBatch([self._draw_normal() for _ in range(self.k)], self)

    def __iter__(self) -> Iterator[MetaBatch]:
        while True:
            yield self.sample()

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
                f"call tracker.record(...) after each normal task"
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
