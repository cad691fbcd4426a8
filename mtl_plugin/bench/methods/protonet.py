"""Prototypical Networks (Snell et al., NeurIPS 2017): nearest class mean in feature space.

Two rows of the benchmark table share this file:

- ``protonet``: no meta-training; the bench's pretrained backbone embeds the
  support set and each query goes to the closest class mean;
- ``protonet-conv4``: Snell et al.'s episodic training of a Conv4 from scratch.


Example::

    method = ProtoNetConv4(ProtoNetConv4Config.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.backbones import conv4
from mtl_plugin.bench.methods.base import BenchContext, FewShotMethod
from mtl_plugin.bench.methods.episodic import fit_episodically
from mtl_plugin.prototypes import DISTANCES, class_prototypes, embed, prototype_logits
from mtl_plugin.tasks import split_support_query

__all__ = [
    "ProtoNet",
    "ProtoNetConfig",
    "ProtoNetConv4",
    "ProtoNetConv4Config",
    "NearestPrototype",
]


@dataclass
class ProtoNetConfig:
    """Nearest class mean on the pretrained backbone.

    Example::

        method = ProtoNet(ProtoNetConfig(distance="cosine"))
    """

    # Snell et al. found squared Euclidean better than cosine for prototypes.
    distance: str = "squared_euclidean"

    @classmethod
    def quick(cls) -> ProtoNetConfig:
        """There is nothing to train, so the quick profile is the paper's setting."""
        return cls()


class NearestPrototype(FewShotMethod):
    """Shared prediction rule: embed with ``self.backbone``, classify by the nearest class mean.

    Subclasses set ``self.backbone`` in ``fit``.

    Example::

        class MyProtoNet(NearestPrototype):
            name = "my-protonet"
            def fit(self, context):
                self.backbone = train_my_backbone(context)
    """

    def __init__(self, distance: str = "squared_euclidean"):
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is unknown; use one of {DISTANCES}")
        self.distance = distance
        self.backbone: nn.Module | None = None
        self.backbone_label = ""

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        if self.backbone is None:
            raise RuntimeError(f"{type(self).__name__}.predict called before fit(context)")
        prototypes = class_prototypes(embed(self.backbone, support_x), support_y, ways)
        logits = prototype_logits(embed(self.backbone, query_x), prototypes, self.distance)
        return logits.to(query_x.device)


class ProtoNet(NearestPrototype):
    """Prototypical classification on the bench's pretrained backbone (no meta-training).

    Example::

        method = ProtoNet(ProtoNetConfig())
        method.fit(context)  # takes a copy of context.pretrained_backbone()
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "protonet"
    uses_pretraining: ClassVar[bool] = True

    def __init__(self, config: ProtoNetConfig | None = None):
        self.config = config or ProtoNetConfig()
        super().__init__(self.config.distance)

    def fit(self, context: BenchContext) -> None:
        self.backbone = context.pretrained_backbone().to(context.device).eval()
        self.backbone_label = context.backbone_name


@dataclass
class ProtoNetConv4Config:
    """Snell et al.'s episodic training of Conv4 (paper defaults, mini-ImageNet).

    Example::

        config = ProtoNetConv4Config.quick()          # 2,400 episodes, minutes on a CPU core
        config = ProtoNetConv4Config(max_episodes=5000)
    """

    hidden: int = 64
    # Snell et al. train with more ways than at test: 30 (1-shot) / 20 (5-shot) on
    # mini-ImageNet, 60 on Omniglot. Capped at the number of meta-train classes.
    train_ways: int = 30
    train_queries: int = 15
    lr: float = 1e-3
    lr_halve_every: int = 2000
    # Snell et al. stop on validation loss; a fixed budget keeps runs comparable.
    max_episodes: int = 20000
    checkpoint_every: int = 500
    # The fraction of the budget whose weights are averaged into the kept model (episodic.tail_average);
    # 0: the last iterate (paper).
    average_last: float = 0.0

    @classmethod
    def quick(cls) -> ProtoNetConv4Config:
        """2,400 episodes for ``mtl bench --profile quick`` (28 px, 2 CPU cores).

        * ``train_ways=20`` (Snell et al.'s 5-shot mini-ImageNet setting; their 1-shot: 30) and
          ``train_queries=5`` (paper: 15): about 4x cheaper per episode;
        * ``max_episodes=2400`` (paper: stop on validation loss): a fixed budget where fits stop
          moving with the floats; shorter runs were still learning fast when they stopped; the
          learning rate halves once, after 2,000 episodes, as in the paper.

        Measurements: docs/profiles.md#protonet-conv4
        """
        return cls(train_ways=20, train_queries=5, max_episodes=2400, checkpoint_every=50)


class ProtoNetConv4(NearestPrototype):
    """ProtoNet trained episodically from scratch on a Conv4 (Snell et al.).

    Example::

        method = ProtoNetConv4(ProtoNetConv4Config.quick())
        method.fit(context)  # resumes from context.work_dir / "checkpoint.pt"
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "protonet-conv4"
    uses_pretraining: ClassVar[bool] = False

    def __init__(self, config: ProtoNetConv4Config | None = None):
        # Snell et al.'s distance, for training and testing alike.
        super().__init__("squared_euclidean")
        self.config = config or ProtoNetConv4Config()
        self.losses: list[float] = []

    def fit(self, context: BenchContext) -> None:
        config = self.config
        benchmark = context.benchmark
        train_ways = min(config.train_ways, len(benchmark.train.labels))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            model = conv4(in_channels=benchmark.channels, hidden=config.hidden, image_size=benchmark.image_size).to(
                context.device
            )
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_halve_every, gamma=0.5)

        def step(tasks) -> float:
            x, y = tasks.sample()
            (support_x, support_y), (query_x, query_y) = split_support_query(x, y, context.shots)
            model.train()
            prototypes = class_prototypes(model(support_x.to(context.device)), support_y, train_ways)
            logits = prototype_logits(model(query_x.to(context.device)), prototypes)
            loss = F.cross_entropy(logits, query_y.to(context.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            return loss.item()

        self.losses = fit_episodically(
            self.name,
            context,
            config,
            step,
            {"model": model, "optimizer": optimizer, "scheduler": scheduler},
            ways=train_ways,
            queries=config.train_queries,
        )
        self.backbone = model.eval()
        self.backbone_label = "conv4"
