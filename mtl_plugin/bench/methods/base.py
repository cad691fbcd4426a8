"""The interface every benchmark method implements.

``mtl bench`` builds one :class:`BenchContext` per (data set, ways, shots),
calls :meth:`FewShotMethod.fit` once, then :meth:`FewShotMethod.predict` on the
same seeded test tasks for every method.

Example::

    method = ProtoNet(ProtoNetConfig())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
    accuracy = (logits.argmax(1) == query_y).float().mean()
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class BenchContext:
    """What a method may use to train: never the test split's labels."""

    benchmark: Any  # mtl_plugin.data.FewShotBenchmark: .train/.val/.test MetaDatasets, .image_size, .channels
    ways: int
    shots: int
    queries: int
    seed: int
    work_dir: Path  # the method's own folder for checkpoints; reuse what is there to resume
    profile: str  # "quick" (embedded data, 2 CPU cores) or "paper" (the papers' budgets, GPU)
    device: torch.device
    # A fresh copy of the backbone pretrained on all meta-train classes, head removed
    # (cached by the bench so that every method that needs it shares one pretraining run).
    pretrained_backbone: Callable[[], nn.Module]
    backbone_name: str = "resnet12"
    progress: bool = True


class FewShotMethod(abc.ABC):
    """A few-shot learner with one training entry point and one prediction entry point."""

    name: ClassVar[str]
    uses_pretraining: ClassVar[bool] = False
    # Transductive methods also learn from the unlabelled queries of the task they classify.
    transductive: ClassVar[bool] = False

    @abc.abstractmethod
    def fit(self, context: BenchContext) -> None:
        """Meta-train (or do nothing, for methods that only adapt at test time)."""

    @abc.abstractmethod
    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Adapt to one support set and return query logits of shape (len(query_x), ways)."""

    def describe_backbone(self) -> str:
        """The backbone as the results table names it."""
        return getattr(self, "backbone_label", "")


class TestTimeMethod(FewShotMethod):
    """A method that trains nothing: it adapts to each task on a frozen copy of the bench's
    pretrained backbone (``finetune``, ``cosine-finetune``, ``linear-probe``).

    Example::

        class MyProbe(TestTimeMethod):
            name = "my-probe"
            def predict(self, support_x, support_y, query_x, ways):
                features = self.frozen_backbone()(support_x)
                ...
    """

    uses_pretraining: ClassVar[bool] = True

    def __init__(self):
        self.backbone: nn.Module | None = None
        self.backbone_label = ""

    def fit(self, context: BenchContext) -> None:
        """Take a copy of the bench's pretrained backbone, in eval mode; nothing is trained."""
        self.backbone = context.pretrained_backbone().to(context.device).eval()
        self.backbone_label = context.backbone_name

    def frozen_backbone(self) -> nn.Module:
        """The backbone taken by :meth:`fit`.

        Raises:
            RuntimeError: :meth:`fit` was not called yet.
        """
        if self.backbone is None:
            raise RuntimeError(f"{type(self).__name__}.predict called before fit(context)")
        return self.backbone
