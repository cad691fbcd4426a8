"""The settings of meta-transfer learning, whose defaults follow the paper: the method's
(:class:`MetaTransferConfig`, all the learner reads) and the loop's (:class:`MetaTrainConfig`, which adds
the task shape, the schedule, the hard-task meta-batch, validation and checkpoints to them).

Example::

    from mtl_plugin.meta_config import MetaTransferConfig, MetaTrainConfig
    learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTransferConfig(inner_steps=10))
    config = MetaTrainConfig(shots=5, hard_tasks=True, iterations=2000)   # a whole run
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtl_plugin.checks import check_seed
from mtl_plugin.errors import UsageError
from mtl_plugin.hard_tasks.transform import MODES as HARD_TASK_MODES

__all__ = ["HEAD_INITS", "MetaTransferConfig", "MetaTrainConfig"]

HEAD_INITS = ("prototype", "kaiming")


def _check_finite_positive(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        # Written so that NaN fails too.
        if not 0 < getattr(config, name) < math.inf:
            raise UsageError(f"{name}={getattr(config, name)} must be a finite number > 0")


@dataclass
class MetaTransferConfig:
    """The method's settings, all that :class:`~mtl_plugin.meta_transfer.MetaTransferLearner` reads.

    * ``inner_lr`` 0.01; ``encoder_lr`` 1e-4 (Φ) and ``head_lr`` 1e-3 (θ), the outer rates that
      :meth:`~mtl_plugin.meta_transfer.MetaTransferLearner.parameter_groups` gives: the official code.
    * ``inner_steps`` 20 while meta-training and ``test_inner_steps`` 100 when adapting at
      validation/test time: the paper-era (TensorFlow) official code (``train_base_epoch_num=20``,
      ``test_base_epoch_num=100``); the later PyTorch port used 100 for both, which costs 5x the
      inner loop for the same result.
    * ``first_order=False``: the paper's meta-gradient flows through the inner loop (the PyTorch
      port is first order; ``first_order=True`` reproduces it).
    * ``head_init="prototype"`` departs from the official code on purpose. Its θ = (W, b) is one
      Kaiming-initialised row per label *position*, but a task's labels are a random permutation
      of its classes, so the class-specific part of θ is noise and only its class-symmetric part
      can be meta-learned, which cancels in the softmax. ``"prototype"`` starts each task's head
      from its support set's class means c_k in the Proto-MAML form W_k = 2·(d⊙c_k)/s²,
      b_k = -(d⊙c_k)·c_k/s²: nearest-class-mean whatever the label order. s², the support
      features' mean squared distance to their mean, fixes the logits' scale per task (without
      it well-pretrained features gave query losses near 17 and meta-training made Φ worse). θ is
      the per-feature weighting d (initialised to 1, meta-learned at ``head_lr``), and the
      meta-gradient reaches Φ through the class means as well as the query features.
      ``"kaiming"`` is the official code's θ (``seed`` draws it).

    Raises ``UsageError`` (a ``ValueError``) for a value out of range or an unknown name.

    Example::

        config = MetaTransferConfig(inner_steps=10, first_order=True)
    """

    inner_steps: int = 20
    test_inner_steps: int = 100
    inner_lr: float = 0.01
    encoder_lr: float = 1e-4
    head_lr: float = 1e-3
    first_order: bool = False
    head_init: str = "prototype"
    seed: int = 0

    def __post_init__(self):
        for name in ("inner_steps", "test_inner_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 0")
        _check_finite_positive(self, ("inner_lr", "encoder_lr", "head_lr"))
        if self.head_init not in HEAD_INITS:
            raise UsageError(f"head_init={self.head_init!r} is unknown; use one of {HEAD_INITS}")
        check_seed(self.seed)


@dataclass
class MetaTrainConfig(MetaTransferConfig):
    """A whole meta-training run: the method's settings (:class:`MetaTransferConfig`) and the loop's.

    The loop's defaults follow the paper and its official code:

    * Adam on Φ and θ at the method's rates, both halved every 1,000 iterations (``lr_step``,
      ``lr_gamma``), 10,000 iterations.
    * ``meta_batch`` 2 normal tasks per iteration, and with ``hard_tasks`` 2 (``hard_meta_batch``)
      hard tasks after them: Algorithm 2 with k = k'. ``hard_history_decay`` 0.9 keeps failure
      classes across meta-batches so that a hard N-way task is made of N failure classes
      (:class:`~mtl_plugin.hard_tasks.ClassAccuracyTracker`).
    * validation on 600 val tasks every 100 iterations keeps the best checkpoint.

    Raises ``UsageError`` (a ``ValueError``) for a value out of range or an unknown name.

    Example::

        config = MetaTrainConfig(shots=5, hard_tasks=True, iterations=2000)
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    iterations: int = 10_000
    meta_batch: int = 2
    lr_step: int = 1_000
    lr_gamma: float = 0.5
    hard_tasks: bool = False
    hard_meta_batch: int = 2
    hard_task_mode: str = "resample"
    hard_history_decay: float | None = 0.9
    val_every: int = 100
    val_tasks: int = 600
    checkpoint_every: int = 100

    def __post_init__(self):
        super().__post_init__()
        positive = (
            "ways",
            "shots",
            "queries",
            "iterations",
            "meta_batch",
            "lr_step",
            "val_every",
            "val_tasks",
            "checkpoint_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ways < 2:
            raise UsageError(f"ways={self.ways}: a task needs at least 2 classes (with 1 every answer is right)")
        if self.hard_meta_batch < 0:
            raise UsageError(f"hard_meta_batch={self.hard_meta_batch} must be >= 0")
        _check_finite_positive(self, ("lr_gamma",))
        if self.hard_task_mode not in HARD_TASK_MODES:
            raise UsageError(
                f"hard_task_mode={self.hard_task_mode!r} must be {' or '.join(map(repr, HARD_TASK_MODES))}"
            )
        if self.hard_history_decay is not None and not 0.0 <= self.hard_history_decay < 1.0:
            raise UsageError(
                f"hard_history_decay={self.hard_history_decay} must be in [0, 1), or None to keep no history"
            )

    def method(self) -> MetaTransferConfig:
        """The method's part of this config, as the learner takes it.

        Example::

            learner = MetaTransferLearner(SSAdapter(backbone), config.ways, config=config.method())
        """
        return MetaTransferConfig(**{name: getattr(self, name) for name in MetaTransferConfig.__dataclass_fields__})
