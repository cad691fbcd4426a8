"""The interface every benchmark method implements.

``mtl bench`` builds one :class:`BenchContext` per (data set, ways, shots),
calls :meth:`FewShotMethod.fit` once (once per fit, each in
:meth:`BenchContext.for_fit`, for a row whose config asks for several: see
:func:`fit_count`), then :meth:`FewShotMethod.predict` on the same seeded test
tasks for every method.

Example::

    method = ProtoNet(ProtoNetConfig())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
    accuracy = (logits.argmax(1) == query_y).float().mean()
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mtl_plugin.checks import MAX_SEED

# Fit k > 0 of a cell trains under seed + k * stride (mod 2**32): distinct from the seeds of the
# neighbouring bench seeds' own fits (a user who runs seeds 0-4 gets 5 independent cells).
FIT_SEED_STRIDE = 100_003


def fit_count(config: Any) -> int:
    """How many independent fits a bench cell of a row with ``config`` averages.

    A bench cell is one fit, as a paper reports. A config with a ``fits`` field may ask for
    more: the cell is then the per-task mean of that many fits on the same test tasks (see
    ``mtl bench``; ``benchmarks/float_spread.py --set fits=N`` measures how far such a mean
    moves between CPUs). Configs without the field are fitted once.

    Args:
        config: a row's config dataclass.

    Returns:
        ``config.fits``, or 1 where the config has no such field.

    Raises:
        ValueError: ``fits`` that is not an integer of 1 or more.

    Example::

        fit_count(MetaNetConfig.quick())                  # 1
        fit_count(replace(MetaNetConfig.quick(), fits=3))  # 3
    """
    fits = getattr(config, "fits", 1)
    if isinstance(fits, bool) or not isinstance(fits, int) or fits < 1:
        raise ValueError(f"{type(config).__name__}(fits={fits!r}): a cell averages 1 or more fits; give fits >= 1")
    return fits


def fit_settings(config: Any) -> dict:
    """What makes one fit of a row with ``config``: every field but ``fits``.

    A fit's checkpoint and work folder are named by these settings, not by the number of fits
    its cell averages, so that raising ``fits`` from 3 to 5 reuses the three fits already
    trained (fit k's seed and folder do not depend on the count either: see
    :meth:`BenchContext.for_fit`).

    Args:
        config: a row's config dataclass.

    Returns:
        ``dataclasses.asdict(config)`` without its ``fits`` entry.

    Example::

        fit_settings(MetaLSTMConfig.quick()) == fit_settings(replace(MetaLSTMConfig.quick(), fits=5))  # True
    """
    settings = asdict(config)
    settings.pop("fits", None)
    return settings


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

    def for_fit(self, fit: int) -> BenchContext:
        """This context for a cell's fit number ``fit`` (from 0): the first is this context
        itself; fit k > 0 trains under its own seed, ``seed + k * FIT_SEED_STRIDE`` modulo
        2**32, in its own folder beside this one's (``<work_dir>-fit<k + 1>``).

        Example::

            second = context.for_fit(1)  # seed 100003 for the bench's seed 0
        """
        if fit == 0:
            return self
        return replace(
            self,
            seed=(self.seed + fit * FIT_SEED_STRIDE) % (MAX_SEED + 1),
            work_dir=self.work_dir.with_name(f"{self.work_dir.name}-fit{fit + 1}"),
        )


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
