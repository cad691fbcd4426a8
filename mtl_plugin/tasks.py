"""Seeded N-way K-shot task construction on top of learn2learn's ``Taskset``.

learn2learn's ``NWays``, ``KShots`` and ``RemapLabels`` draw from Python's global
``random`` module, so two runs (or two methods in one benchmark) cannot be made
to see the same tasks without touching global state, and ``NWays`` raises on
Python 3.11 when another transform runs before it (``random.sample`` on a set).
The transforms here are drop-in replacements that each own a ``random.Random``.

Example::

    from mtl_plugin.tasks import build_taskset, split_support_query
    tasks = build_taskset(meta_dataset, ways=5, shots=1, queries=15, seed=0)
    x, y = tasks.sample()
    (xs, ys), (xq, yq) = split_support_query(x, y, shots=1)
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import learn2learn as l2l
import torch
from learn2learn.data.task_dataset import DataDescription

RandomLike = int | random.Random | None

__all__ = [
    "NWays",
    "KShots",
    "RemapLabels",
    "as_meta",
    "as_random",
    "build_taskset",
    "check_task_shape",
    "split_support_query",
]


def as_random(seed: RandomLike) -> random.Random:
    """A private ``random.Random``: an int seeds a new one, an instance is used as is."""
    if isinstance(seed, random.Random):
        return seed
    return random.Random(seed)


def _labels_of(dataset, description: Iterable[DataDescription]) -> list:
    # Sorted so that the draw depends on the seed only, never on set iteration order.
    return sorted({dataset.indices_to_labels[dd.index] for dd in description})


def as_meta(dataset) -> l2l.data.MetaDataset:
    """``dataset`` itself if it is a learn2learn ``MetaDataset``, else one built over it."""
    return dataset if isinstance(dataset, l2l.data.MetaDataset) else l2l.data.MetaDataset(dataset)


def check_task_shape(dataset, ways: int, samples_per_class: int) -> None:
    """Raise a ``ValueError`` naming the problem if ``dataset`` cannot give such tasks."""
    dataset = as_meta(dataset)
    labels = list(dataset.labels)
    if ways < 1 or samples_per_class < 1:
        raise ValueError(f"ways ({ways}) and samples per class ({samples_per_class}) must be >= 1")
    if ways > len(labels) and len(labels) < 2:
        # "use at most 1 ways" would name a task no few-shot method takes.
        raise ValueError(
            f"the data set holds {len(labels)} class, but a task tells {ways} classes apart (2 or "
            f"more): add classes to it"
        )
    if ways > len(labels):
        raise ValueError(
            f"ways={ways} is larger than the number of classes in the data set ({len(labels)}); "
            f"use at most {len(labels)} ways"
        )
    for label in labels:
        count = len(dataset.labels_to_indices[label])
        if count < samples_per_class:
            raise ValueError(
                f"class {label!r} has {count} images but a task needs {samples_per_class} "
                f"(shots + queries); lower shots or queries, or drop classes that small"
            )


class NWays:
    """Keep the samples of ``n`` classes drawn with a private generator.

    A task transform in learn2learn's sense: a callable on a task description
    (``None`` or a list of ``DataDescription``) that returns a new one. The
    signature is learn2learn's ``NWays(dataset, n=2)`` plus a keyword-only ``seed``
    (an int or a ``random.Random``), so it replaces learn2learn's unchanged;
    learn2learn's draws from the global ``random`` module (and fails on Python 3.11).

    Example::

        transforms = [NWays(md, n=5, seed=0), KShots(md, k=16, seed=0), LoadData(md), RemapLabels(md, seed=0)]
    """

    def __init__(self, dataset, n: int = 2, *, seed: RandomLike = None):
        self.dataset = dataset
        self.n = n
        self.rng = as_random(seed)

    def __call__(self, description):
        if description is None:
            classes = self.rng.sample(sorted(self.dataset.labels), k=self.n)
            return [DataDescription(index) for label in classes for index in self.dataset.labels_to_indices[label]]
        chosen = set(self.rng.sample(_labels_of(self.dataset, description), k=self.n))
        return [dd for dd in description if self.dataset.indices_to_labels[dd.index] in chosen]


class KShots:
    """Keep ``k`` samples of each class present, drawn without (or with) replacement.

    learn2learn's ``KShots(dataset, k=1, replacement=False)`` plus a keyword-only ``seed``.

    Example::

        shots = KShots(md, k=16, seed=0)
    """

    def __init__(self, dataset, k: int = 1, replacement: bool = False, *, seed: RandomLike = None):
        self.dataset = dataset
        self.k = k
        self.replacement = replacement
        self.rng = as_random(seed)

    def __call__(self, description):
        if description is None:
            description = [DataDescription(i) for i in range(len(self.dataset))]
        by_class: dict = {}
        for dd in description:
            by_class.setdefault(self.dataset.indices_to_labels[dd.index], []).append(dd)
        result = []
        for label in sorted(by_class):
            members = by_class[label]
            if self.replacement:
                result.extend(self.rng.choices(members, k=self.k))
                continue
            if len(members) < self.k:
                raise ValueError(f"class {label!r} has {len(members)} images but the task needs {self.k} per class")
            result.extend(self.rng.sample(members, k=self.k))
        return result


class RemapLabels:
    """Map the task's classes to 0..n-1 in an order drawn with a private generator.

    learn2learn's ``RemapLabels(dataset, shuffle=True)`` plus a keyword-only ``seed``;
    ``shuffle=False`` numbers the classes in sorted label order.

    Example::

        remap = RemapLabels(md, seed=0)
    """

    def __init__(self, dataset, shuffle: bool = True, *, seed: RandomLike = None):
        self.dataset = dataset
        self.shuffle = shuffle
        self.rng = as_random(seed)

    def __call__(self, description):
        labels = _labels_of(self.dataset, description)
        if self.shuffle:
            self.rng.shuffle(labels)
        mapping = {label: i for i, label in enumerate(labels)}

        def remap(sample, mapping=mapping):
            # A data set may give its label as a 0-d tensor, which hashes by identity.
            label = sample[1].item() if torch.is_tensor(sample[1]) else sample[1]
            return (sample[0], mapping[label])

        for dd in description:
            dd.transforms.append(remap)
        return description


def build_taskset(
    dataset,
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int = -1,
    seed: int = 0,
) -> l2l.data.Taskset:
    """An N-way, (shots + queries)-per-class ``Taskset`` whose tasks depend only on ``seed``.

    With ``num_tasks > 0`` learn2learn caches task ``i`` the first time it is
    built; read tasks in order (``taskset[i]`` for i = 0, 1, ...) and every
    method sees the very same tasks.
    """
    dataset = as_meta(dataset)
    check_task_shape(dataset, ways, shots + queries)
    rng = random.Random(seed)
    transforms = [
        NWays(dataset, ways, seed=rng),
        KShots(dataset, shots + queries, seed=rng),
        l2l.data.transforms.LoadData(dataset),
        RemapLabels(dataset, seed=rng),
    ]
    return l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=num_tasks)


def split_support_query(
    data: torch.Tensor, labels: torch.Tensor, shots: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Split a task into ``shots`` support samples per class and the rest as queries."""
    labels = labels.long()
    support = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero(as_tuple=True)[0]
        if len(members) <= shots:
            raise ValueError(f"class {int(label)} has {len(members)} samples in the task: need more than shots={shots}")
        support[members[:shots]] = True
    return (data[support], labels[support]), (data[~support], labels[~support])
