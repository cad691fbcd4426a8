"""The task transform that builds hard tasks from failure classes, in place of ``NWays``.

Example::

    hard = Taskset(md, [HardTaskTransform(md, n=5, tracker=tracker, seed=0),
                        KShots(md, k=16, seed=0), LoadData(md), RemapLabels(md, seed=0)])
"""

from __future__ import annotations

import learn2learn as l2l
from learn2learn.data.task_dataset import DataDescription
from torch.utils.data import get_worker_info

from mtl_plugin.hard_tasks.tracker import ClassAccuracyTracker
from mtl_plugin.tasks import NWays, RandomLike, as_random

__all__ = ["MODES", "HardTaskTransform"]

MODES = ("resample", "reuse")


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
            raise ValueError(f"n={n} must be between 1 and the number of classes in the data set ({len(labels)})")
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
