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
from typing import ClassVar

import learn2learn as l2l
import torch
import torch.nn.functional as F

from mtl_plugin.backbones import conv4
from mtl_plugin.bench.methods.base import BenchContext, FewShotMethod
from mtl_plugin.bench.methods.episodic import fit_episodically, mean_task_update, sample_episode

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
    checkpoint_every: int = 1000
    # The fraction of the budget whose weights are averaged into the kept model (episodic.tail_average);
    # 0: the last iterate (paper).
    average_last: float = 0.0

    @classmethod
    def omniglot(cls) -> MAMLConfig:
        """Finn et al.'s Omniglot settings: 64 filters, one step of 0.4, meta-batch 32, 3 test steps."""
        return cls(hidden=64, inner_lr=0.4, train_steps=1, test_steps=3, meta_batch=32)

    @classmethod
    def quick(cls) -> MAMLConfig:
        """1,200 meta-updates of 4 tasks for ``mtl bench --profile quick`` (28 px, 2 CPU cores).

        Departs from :meth:`omniglot` where minutes of training, not 60,000 meta-updates, call for it:

        * ``test_steps=1`` (Omniglot: 3), as in training: a briefly meta-trained initialisation
          overshoots after the step it was trained for;
        * ``inner_lr=0.1`` (Omniglot: 0.4): learns faster per meta-update here;
        * ``hidden=32`` (mini-ImageNet's width) and ``train_queries=5`` (Omniglot: K,
          mini-ImageNet: 15): about 3.5x cheaper per task;
        * ``meta_batch=4`` (Omniglot: 32) and ``average_last=0.25`` (Finn et al.: the last
          iterate): a steadier meta-gradient and kept model than 2 tasks or the last iterate;
        * ``max_episodes=1200``: where fits stop moving with the floats; shorter runs were still
          learning fast when they stopped, and rounding set how far they got.

        Measurements: docs/profiles.md#maml
        """
        return replace(
            cls.omniglot(),
            hidden=32,
            inner_lr=0.1,
            test_steps=1,
            meta_batch=4,
            train_queries=5,
            max_episodes=1200,
            checkpoint_every=100,
            average_last=0.25,
        )


class MAML(FewShotMethod):
    """Model-agnostic meta-learning of a Conv4 trained from scratch.

    Example::

        method = MAML(MAMLConfig.omniglot())
        method.fit(context)
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "maml"
    uses_pretraining: ClassVar[bool] = False

    def __init__(self, config: MAMLConfig | None = None):
        self.config = config or MAMLConfig()
        self.maml: l2l.algorithms.MAML | None = None
        self.ways = 0
        self.device = torch.device("cpu")
        self.losses: list[float] = []
        self.backbone_label = "conv4"

    def _adapted(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        first_order: bool,
        losses: list[float] | None = None,
    ) -> torch.nn.Module:
        learner = self.maml.clone()
        for _ in range(steps):
            loss = F.cross_entropy(learner(support_x), support_y)
            if losses is not None:
                losses.append(loss.item())
            learner.adapt(loss, first_order=first_order)
        return learner

    def support_losses(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None) -> list[float]:
        """The support cross-entropy before each test-time inner step and after the last one.

        A well-chosen step size and number of steps give a non-increasing
        sequence; a rise means adaptation overshoots.

        Args:
            support_x: the support images.
            support_y: their labels, ``0 .. ways - 1``.
            steps: inner steps; ``config.test_steps`` if not given.

        Returns:
            ``steps + 1`` losses: the meta-learned initialisation's, then one after each step.

        Raises:
            RuntimeError: if called before :meth:`fit`.

        Example::

            losses = method.support_losses(support_x, support_y)   # e.g. [1.61, 0.42]
        """
        if self.maml is None:
            raise RuntimeError("MAML.support_losses called before fit(context)")
        steps = self.config.test_steps if steps is None else steps
        support_x, support_y = support_x.to(self.device), support_y.to(self.device).long()
        losses: list[float] = []
        with torch.enable_grad():
            learner = self._adapted(support_x, support_y, steps, first_order=True, losses=losses)
        with torch.no_grad():
            losses.append(F.cross_entropy(learner(support_x), support_y).item())
        return losses

    def fit(self, context: BenchContext) -> None:
        config, benchmark = self.config, context.benchmark
        self.ways, self.device = context.ways, context.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            model = conv4(
                in_channels=benchmark.channels,
                hidden=config.hidden,
                num_classes=context.ways,
                image_size=benchmark.image_size,
            )
        # NCHW, not conv4's channels-last: the second-order meta-gradient runs batch norm's double
        # backward, and the meta-step is 1.2x faster in NCHW on CPU (docs/speed.md). Train mode for
        # good: batch statistics at meta-train and test time alike.
        model.to(context.device, memory_format=torch.contiguous_format).train()
        self.maml = l2l.algorithms.MAML(model, lr=config.inner_lr, first_order=config.first_order)
        optimizer = torch.optim.Adam(self.maml.parameters(), lr=config.meta_lr)

        def task_loss(tasks) -> torch.Tensor:
            support_x, support_y, query_x, query_y = sample_episode(tasks, context.shots, context.device)
            learner = self._adapted(support_x, support_y, config.train_steps, config.first_order)
            return F.cross_entropy(learner(query_x), query_y)

        def step(tasks) -> float:
            return mean_task_update(optimizer, task_loss, tasks, config.meta_batch)

        self.losses = fit_episodically(
            self.name,
            context,
            config,
            step,
            {"model": model, "optimizer": optimizer},
            ways=context.ways,
            queries=config.train_queries,
        )

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        if self.maml is None:
            raise RuntimeError("MAML.predict called before fit(context)")
        if ways != self.ways:
            raise ValueError(
                f"ways={ways}, but this MAML was meta-trained with a {self.ways}-way head; "
                f"fit it on a context with ways={ways}"
            )
        support_y = support_y.to(self.device).long()
        with torch.enable_grad():
            # Second-order terms only matter for the meta-gradient, never at test time.
            learner = self._adapted(support_x.to(self.device), support_y, self.config.test_steps, first_order=True)
        with torch.no_grad():
            return learner(query_x.to(self.device)).to(query_x.device)
