"""The failure classes of the hard-task meta-batch: per-class accuracy of each normal task, and their history.

Example::

    tracker = ClassAccuracyTracker(meta_dataset, seed=0)
    tracker.record(task.classes, query_logits, query_y, indices=task.indices)
    print(tracker.failure_classes)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import learn2learn as l2l
import torch
from learn2learn.data.task_dataset import DataDescription

from mtl_plugin.tasks import RandomLike, as_random

__all__ = ["ClassAccuracyTracker", "TaskAccuracy", "task_classes"]


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
            f"task labels {sorted(mapping)} are not 0..{len(mapping) - 1}: end the transforms with RemapLabels"
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
    failure_indices: tuple | None = None
    margins: dict | None = None

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
        history_decay: float | None = 0.9,
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
        indices: Sequence[int] | None = None,
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

    def _indices_of(self, failure, classes: list, indices: Sequence[int] | None) -> tuple | None:
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
