"""Tiny in-memory few-shot data for tests: each class a fixed random pattern plus noise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import learn2learn as l2l
import torch

from mtl_plugin.bench.methods.base import BenchContext


class PatternImages(torch.utils.data.Dataset):
    """(image, int label) pairs, as the real data sets give them."""

    def __init__(self, images: torch.Tensor, labels: list[int]):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def pattern_split(classes: int, per_class: int, side: int, seed: int, noise: float) -> l2l.data.MetaDataset:
    """``classes`` seeded 1 x side x side patterns, ``per_class`` noisy copies of each."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 1, side, side, generator=generator)
    labels = [c for c in range(classes) for _ in range(per_class)]
    images = patterns[labels] + noise * torch.randn(len(labels), 1, side, side, generator=generator)
    return l2l.data.MetaDataset(PatternImages(images, labels))


@dataclass
class TinyBenchmark:
    """Stands in for mtl_plugin.data.FewShotBenchmark."""

    train: l2l.data.MetaDataset
    val: l2l.data.MetaDataset
    test: l2l.data.MetaDataset
    train_augmented: l2l.data.MetaDataset | None = None
    channels: int = 1
    image_size: int = 16
    standard: bool = False


def raising_at_call(function, call: int, error=KeyboardInterrupt):
    """``function``, wrapped to raise ``error`` at its ``call``-th call instead: a kill at a chosen point."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return function(*args, **kwargs)

    return wrapper


def tiny_context(benchmark, work_dir, *, ways: int, shots: int, queries: int, **fields) -> BenchContext:
    """A bench context for tiny data: the quick profile on the CPU, seed 0, no progress bars and
    no pretrained backbone unless ``fields`` (any other :class:`BenchContext` field) say otherwise."""
    defaults = dict(
        seed=0, profile="quick", device=torch.device("cpu"), pretrained_backbone=lambda: None, progress=False
    )
    return BenchContext(
        benchmark=benchmark, work_dir=work_dir, ways=ways, shots=shots, queries=queries, **{**defaults, **fields}
    )


def killed_at_write(write: int, calls: list | None = None):
    """``os.replace`` that raises ``KeyboardInterrupt`` instead of its ``write``-th rename: every
    atomic write of the package ends in one, so this is a kill right after the ``write - 1``-th
    write landed (its temporary file left behind, as after ``kill -9``). ``calls`` collects the
    targets renamed (pass ``write=0`` to count a whole run's writes)."""
    real, seen = os.replace, [] if calls is None else calls

    def replace(source, target):
        seen.append(target)
        if len(seen) == write:
            raise KeyboardInterrupt
        return real(source, target)

    return replace
