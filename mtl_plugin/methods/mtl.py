"""The paper's rows in ``mtl bench``: MTL, MTL + hard-task meta-batch, and "train from scratch".

* ``mtl``: SS (Φ) and the FC head's initialisation θ meta-learned on the
  pretrained, frozen backbone;
* ``mtl-ht``: the same with the hard-task meta-batch;
* ``scratch``: the same backbone and head meta-trained episodically from random
  initialisation, every weight learned (the ablation's "train from scratch").

Each writes its run (``metrics.csv`` with the validation curve, ``curve.png``,
checkpoints) to ``context.work_dir`` and resumes from it.

Example::

    method = MTL(MTLConfig.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Optional

import torch
from torch import nn

from mtl_plugin.backbones import build_backbone
from mtl_plugin.meta_training import meta_train
from mtl_plugin.meta_transfer import MetaTrainConfig, MetaTransferLearner
from mtl_plugin.methods.base import BenchContext, FewShotMethod
from mtl_plugin.ss import SSAdapter

__all__ = ["MTL", "MTLConfig", "MTLHardTasks", "Scratch"]


@dataclass
class MTLConfig:
    """Meta-training budget and SS options of the benchmark rows.

    ``meta`` holds the paper's settings (:class:`MetaTrainConfig`); ``ways``,
    ``shots``, ``queries`` and ``seed`` are taken from the bench context (its
    queries fit the data set's smallest class).

    Example::

        config = MTLConfig(meta=MetaTrainConfig(iterations=2000))
    """

    meta: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    granularity: str = "kernel"
    bn: str = "frozen"
    # The scratch row learns every backbone weight from random initialisation,
    # where Φ's 1e-4 would barely move it: MAML's outer lr instead.
    scratch_encoder_lr: float = 1e-3

    @classmethod
    def quick(cls) -> "MTLConfig":
        """100 iterations of 4 tasks (mtl: 4 normal; mtl-ht: 2 normal + 2 hard), 20 inner steps, small validation.

        About 35-50 CPU-seconds per shot setting at 28 px (Conv4, one thread; the three
        rows cost about the same since all see 4 tasks an iteration), plus about 12 s to
        adapt on 300 test tasks.
        """
        return cls(meta=MetaTrainConfig(iterations=100, meta_batch=2, hard_meta_batch=2, lr_step=100,
                                        inner_steps=20, test_inner_steps=50, encoder_lr=1e-3, head_lr=1e-2,
                                        val_every=50, val_tasks=50, checkpoint_every=50))


class MTL(FewShotMethod):
    """Meta-transfer learning: SS + head initialisation meta-learned on the pretrained backbone.

    Example::

        method = MTL(MTLConfig.quick())
        method.fit(context)
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "mtl"
    uses_pretraining: ClassVar[bool] = True
    hard_tasks: ClassVar[bool] = False

    def __init__(self, config: Optional[MTLConfig] = None):
        self.config = config or MTLConfig()
        self.learner: Optional[MetaTransferLearner] = None
        self.backbone_label = ""

    def encoder(self, context: BenchContext) -> nn.Module:
        """The module whose trainable parameters are meta-learned."""
        return SSAdapter(context.pretrained_backbone(), self.config.granularity, self.config.bn)

    def meta_config(self, context: BenchContext) -> MetaTrainConfig:
        """The meta-training config for this context's task shape.

        Without hard tasks the meta-batch holds ``meta_batch + hard_meta_batch``
        normal tasks: every row meta-trains on as many tasks per iteration as
        ``mtl-ht``, so that the two rows differ by the choice of the hard tasks alone.
        """
        meta = self.config.meta
        meta_batch = meta.meta_batch if self.hard_tasks else meta.meta_batch + meta.hard_meta_batch
        return replace(meta, ways=context.ways, shots=context.shots, queries=context.queries, seed=context.seed,
                       meta_batch=meta_batch, hard_tasks=self.hard_tasks)

    def fit(self, context: BenchContext) -> None:
        config = self.meta_config(context)
        learner = MetaTransferLearner(self.encoder(context), context.ways, config).to(context.device)
        model_info = {"backbone": context.backbone_name, "in_channels": context.benchmark.channels,
                      "image_size": context.benchmark.image_size, "method": self.name}
        meta_train(learner, context.benchmark, context.work_dir, resume=True, progress=context.progress,
                   model_info=model_info)
        self.learner = learner
        self.backbone_label = context.backbone_name

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        if self.learner is None:
            raise RuntimeError(f"{type(self).__name__}.predict called before fit(context)")
        return self.learner.predict(support_x, support_y, query_x, ways).to(query_x.device)


class MTLHardTasks(MTL):
    """MTL with the hard-task meta-batch (k normal tasks, then k' tasks of their failure classes).

    Example::

        method = MTLHardTasks(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "mtl-ht"
    hard_tasks: ClassVar[bool] = True


class Scratch(MTL):
    """The backbone and head meta-trained from random initialisation, every weight learned.

    Example::

        method = Scratch(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "scratch"
    uses_pretraining: ClassVar[bool] = False

    def encoder(self, context: BenchContext) -> nn.Module:
        benchmark = context.benchmark
        # Seeded without touching the caller's global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            return build_backbone(context.backbone_name, in_channels=benchmark.channels,
                                  image_size=benchmark.image_size)

    def meta_config(self, context: BenchContext) -> MetaTrainConfig:
        return replace(super().meta_config(context), encoder_lr=self.config.scratch_encoder_lr)
