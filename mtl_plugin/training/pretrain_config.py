"""The settings of a pretraining run: :class:`PretrainConfig`, whose defaults are the official MTL code's.

Example::

    from mtl_plugin.training.pretrain_config import PretrainConfig
    config = PretrainConfig.quick(epochs=16)        # the bench's CPU-sized run
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mtl_plugin.checks import check_seed
from mtl_plugin.errors import UsageError

__all__ = ["HEADS", "OPTIMIZERS", "SCHEDULES", "PretrainConfig"]

SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")
# The classifier trained on top of the backbone and dropped after: MTL's linear one, or Baseline++'s cosine one.
HEADS = ("linear", "cosine")
# Options added after runs were first recorded: left out of :meth:`PretrainConfig.record` at
# their defaults, so that the records (and the bench's folder digests) of earlier runs stay.
_LATER_OPTIONS = ("optimizer", "warmup_steps", "warmup_share", "label_smoothing", "head")


@dataclass
class PretrainConfig:
    """Pretraining hyper-parameters; defaults are the official MTL code's.

    SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, batch 128, 110 epochs,
    lr x0.2 every 30 epochs; validation on 600 5-way 1-shot val tasks per epoch.
    ``steps_per_epoch`` caps an epoch (``None``: one pass over the data), for
    small budgets.

    For networks that SGD does not train from scratch (a small vision transformer):
    ``optimizer="adamw"`` (decoupled ``weight_decay``; ``momentum`` and ``nesterov``
    unused), ``warmup_steps`` of linear warmup before ``schedule`` (which then runs
    over the remaining steps), and ``label_smoothing`` of the cross-entropy.
    ``warmup_share`` gives the warmup as a share of the run's steps instead, so that it fits a
    data set of any size (an epoch is at most one pass over the data).

    ``head="cosine"`` trains a cosine classifier (:class:`~mtl_plugin.heads.CosineClassifier`,
    Baseline++) in place of the linear one; either is dropped after pretraining. With Conv4 at
    lr 0.1 it scored below the linear head on three data sets (docs/pretraining.md).

    Raises:
        UsageError: an unknown schedule or a value out of range (e.g. ``lr <= 0``, ``epochs < 1``, a seed
            outside 0..:data:`~mtl_plugin.checks.MAX_SEED`).

    Example::

        config = PretrainConfig(backbone="resnet12", schedule="cosine")
    """

    backbone: str = "resnet12"
    epochs: int = 110
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "step"
    lr_step: int = 30
    lr_gamma: float = 0.2
    steps_per_epoch: int | None = None
    val_ways: int = 5
    val_shots: int = 1
    val_queries: int = 15
    val_tasks: int = 600
    seed: int = 0
    optimizer: str = "sgd"
    warmup_steps: int = 0
    warmup_share: float = 0.0
    label_smoothing: float = 0.0
    head: str = "linear"

    @classmethod
    def quick(
        cls,
        backbone: str = "conv4",
        seed: int = 0,
        *,
        epochs: int = 40,
        steps_per_epoch: int = 100,
        warmup_share: float = 0.1,
    ) -> PretrainConfig:
        """A CPU-sized run, the one ``mtl bench --profile quick`` shares between its rows: 4,000
        steps of 64 images (40 epochs of 100) at lr 0.1, a linear warmup over the first tenth of
        the steps, then a cosine schedule; validated on 50 tasks an epoch. On kanji (28 px, Conv4)
        it ends at 94 % training accuracy in about 5 minutes on 2 CPU threads.

        The warmup is the one change to the recipe first chosen on kanji: across three data sets it
        had the smallest worst-case shortfall of the recipes tried, and on kanji it cost nothing
        (docs/pretraining.md).

        Args:
            backbone: the backbone's name.
            seed: the run's seed.
            epochs: the budget in epochs; the cosine schedule ends with it.
            steps_per_epoch: steps of 64 images an epoch.
            warmup_share: the share of the steps spent warming up (0: none).

        Example::

            backbone = pretrain(get_benchmark("kanji"), PretrainConfig.quick(epochs=16), "runs/pretrain")
        """
        return cls(
            backbone=backbone,
            epochs=epochs,
            batch_size=64,
            lr=0.1,
            schedule="cosine",
            steps_per_epoch=steps_per_epoch,
            val_tasks=50,
            seed=seed,
            warmup_share=warmup_share,
        )

    def record(self) -> dict[str, Any]:
        """The config as a dict, the options added later (optimizer, warmup, label smoothing)
        only where they differ from their defaults.

        Leaving them out at their defaults keeps the record of a run as it was written before
        they existed, so that the bench's pretraining folders (named by a digest of it) stay.

        Returns:
            The fields by name.

        Example::

            "optimizer" in PretrainConfig.quick().record()   # False
        """
        defaults = PretrainConfig()
        return {
            name: value
            for name, value in asdict(self).items()
            if name not in _LATER_OPTIONS or value != getattr(defaults, name)
        }

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.head not in HEADS:
            raise UsageError(f"head={self.head!r} must be one of {HEADS}")
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.warmup_share < 1:
            raise UsageError(f"warmup_share={self.warmup_share} must be in [0, 1): a share of the run's steps")
        if self.warmup_steps and self.warmup_share:
            raise UsageError(
                f"warmup_steps={self.warmup_steps} and warmup_share={self.warmup_share}: give one of them, not both"
            )
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        minimums = {
            "epochs": 1,
            "batch_size": 1,
            "lr_step": 1,
            "val_tasks": 1,
            "val_ways": 2,
            "val_shots": 1,
            "val_queries": 1,
        }
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise UsageError(f"{name}={getattr(self, name)} must be >= {minimum}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UsageError(f"steps_per_epoch={self.steps_per_epoch} must be >= 1 or None")
        if not 0 < self.lr < math.inf or not 0 <= self.weight_decay < math.inf or not 0 <= self.momentum < 1:
            raise UsageError(
                f"lr={self.lr}, weight_decay={self.weight_decay}, momentum={self.momentum}: "
                f"need a finite lr > 0, a finite weight_decay >= 0 and 0 <= momentum < 1"
            )
        check_seed(self.seed)
