"""MAML (Finn et al., ICML 2017) on Conv4, through ``learn2learn.algorithms.MAML``.

The whole Conv4 (with a ``ways``-way head) is meta-learned so that a few
gradient steps on a support set fit the task. Batch norm always uses the
current batch's statistics, as in Finn et al.'s code (no running averages).

Example::

    method = MAML(MAMLConfig.quick())
    method.fit(context)  # resumes from context.work_dir / "checkpoint.pt"
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import learn2learn as l2l
import torch
import torch.nn.functional as F

from mtl_plugin.backbones import conv4
from mtl_plugin.methods.base import BenchContext, FewShotMethod
from mtl_plugin.methods.episodic import fit_episodically
from mtl_plugin.tasks import split_support_query

__all__ = ["MAML", "MAMLConfig"]


@dataclass
class MAMLConfig:
    """Finn et al.'s mini-ImageNet settings; :meth:`omniglot` gives their Omniglot ones.

    One "episode" of the budget is one meta-update over ``meta_batch`` tasks.

    Example::

        config = MAMLConfig()                 # mini-ImageNet, 84 px
        config = MAMLConfig.omniglot()        # 28 px characters
        config = MAMLConfig(first_order=True) # FOMAML
    """

    hidden: int = 32  # Finn et al. used 32 filters on mini-ImageNet to limit overfitting.
    inner_lr: float = 0.01
    train_steps: int = 5
    test_steps: int = 10
    meta_lr: float = 1e-3
    meta_batch: int = 4
    first_order: bool = False
    train_queries: int = 15
    max_episodes: int = 60000
    time_budget_s: Optional[float] = None
    checkpoint_every: int = 1000

    @classmethod
    def omniglot(cls) -> "MAMLConfig":
        """Finn et al.'s Omniglot settings: 64 filters, one step of 0.4, meta-batch 32, 3 test steps."""
        return cls(hidden=64, inner_lr=0.4, train_steps=1, test_steps=3, meta_batch=32)

    @classmethod
    def quick(cls) -> "MAMLConfig":
        """Omniglot settings on a 30 s budget (2 CPU cores), with a smaller meta-batch."""
        return replace(cls.omniglot(), meta_batch=4, max_episodes=2000, time_budget_s=30.0,
                       checkpoint_every=100)


class MAML(FewShotMethod):
    """Model-agnostic meta-learning of a Conv4 trained from scratch.

    Example::

        method = MAML(MAMLConfig.omniglot())
        method.fit(context)
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "maml"
    uses_pretraining: ClassVar[bool] = False

    def __init__(self, config: Optional[MAMLConfig] = None):
        self.config = config or MAMLConfig()
        self.maml: Optional[l2l.algorithms.MAML] = None
        self.ways = 0
        self.device = torch.device("cpu")
        self.losses: list[float] = []
        self.backbone_label = "conv4"

    def _adapted(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
                 first_order: bool) -> torch.nn.Module:
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_x), support_y), first_order=first_order)
        return learner

    def fit(self, context: BenchContext) -> None:
        config, benchmark = self.config, context.benchmark
        self.ways, self.device = context.ways, context.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            model = conv4(in_channels=benchmark.channels, hidden=config.hidden,
                          num_classes=context.ways, image_size=benchmark.image_size)
        # Train mode for good: batch statistics at meta-train and test time alike.
        model.to(context.device).train()
        self.maml = l2l.algorithms.MAML(model, lr=config.inner_lr, first_order=config.first_order)
        optimizer = torch.optim.Adam(self.maml.parameters(), lr=config.meta_lr)

        def step(tasks) -> float:
            optimizer.zero_grad()
            total = 0.0
            for _ in range(config.meta_batch):
                x, y = tasks.sample()
                (support_x, support_y), (query_x, query_y) = split_support_query(x, y, context.shots)
                learner = self._adapted(support_x.to(context.device), support_y.to(context.device),
                                        config.train_steps, config.first_order)
                # Backward per task: the graph of one task at a time stays in memory.
                loss = F.cross_entropy(learner(query_x.to(context.device)),
                                       query_y.to(context.device)) / config.meta_batch
                loss.backward()
                total += loss.item()
            optimizer.step()
            return total

        self.losses = fit_episodically(
            self.name, context, config, step, {"model": model, "optimizer": optimizer},
            ways=context.ways, queries=config.train_queries,
        )

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        if self.maml is None:
            raise RuntimeError("MAML.predict called before fit(context)")
        if ways != self.ways:
            raise ValueError(f"ways={ways}, but this MAML was meta-trained with a {self.ways}-way head; "
                             f"fit it on a context with ways={ways}")
        support_y = support_y.to(self.device).long()
        with torch.enable_grad():
            # Second-order terms only matter for the meta-gradient, never at test time.
            learner = self._adapted(support_x.to(self.device), support_y, self.config.test_steps,
                                    first_order=True)
        with torch.no_grad():
            return learner(query_x.to(self.device)).to(query_x.device)
