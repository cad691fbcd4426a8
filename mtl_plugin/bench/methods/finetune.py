"""Fine-tuning the pretrained backbone with a new head on each support set.

The MTL paper's "finetune on pre-train model" ablation row: the backbone
pretrained on all meta-train classes, its classifier replaced by a new FC that
is trained (with, by default, the whole network) on the task's support set.
:func:`finetune_on_support` is the adaptation loop; cosine-finetune reuses it
with another head and loss.

Example::

    method = Finetune(FinetuneConfig.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.bench.methods.base import TestTimeMethod
from mtl_plugin.prototypes import device_of, embed

__all__ = [
    "Finetune",
    "FinetuneConfig",
    "cross_entropy_on_support",
    "finetune_on_support",
    "zero_linear_head",
]

OPTIMIZERS = ("sgd", "adam")

# (support logits, support labels, query logits or None) -> scalar loss
SupportLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (support features, support labels, ways) -> a fresh head
HeadBuilder = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]


@dataclass
class FinetuneConfig:
    """How a task's support set adapts the head (and the backbone).

    The paper does not give the ablation's schedule; the defaults are those of
    MTL's base learner (100 full-batch gradient steps, lr 0.01) for the new FC,
    with a 10x smaller lr for the pretrained layers so that 5-25 images do not
    wreck them.

    Example::

        config = FinetuneConfig(steps=50, train_backbone=False)
    """

    steps: int = 100
    head_lr: float = 0.01
    backbone_lr: float = 0.001
    # True: the paper's row (whole network + FC). False: a linear probe on cached
    # features, about 100x cheaper, for CPU runs.
    train_backbone: bool = True
    optimizer: str = "sgd"

    @classmethod
    def quick(cls) -> FinetuneConfig:
        """Frozen backbone, head trained on cached features: milliseconds per task on CPU."""
        return cls(steps=50, head_lr=0.01, train_backbone=False, optimizer="adam")

    @classmethod
    def deep(cls) -> FinetuneConfig:
        """The paper's row for ``--profile deep``: every pretrained weight and a new head trained on
        each support set (quick's Adam, 50 steps, head lr 0.01), the backbone at 1e-4, the rate
        at which the FT ablation rows learn pretrained weights. On a deep backbone this is the
        fine-tuning that SS is meant to beat; a few seconds per task on a CPU."""
        return cls(steps=50, head_lr=0.01, backbone_lr=1e-4, train_backbone=True, optimizer="adam")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if self.steps < 0:
            raise ValueError(f"steps={self.steps} must be >= 0")


def zero_linear_head(support_features: torch.Tensor, support_y: torch.Tensor, ways: int) -> nn.Linear:
    """A new FC layer initialised to zero.

    Cross-entropy on a linear head over fixed features is convex, so the start
    does not matter there, and zeros keep predictions free of any random draw.

    Example::

        head = zero_linear_head(support_features, support_y, ways=5)  # all logits 0
    """
    head = nn.Linear(support_features.shape[1], ways)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(support_features.device)


def cross_entropy_on_support(
    support_logits: torch.Tensor, support_y: torch.Tensor, query_logits: torch.Tensor | None
) -> torch.Tensor:
    """Plain cross-entropy on the support set; ``query_logits`` is unused.

    Example::

        loss = cross_entropy_on_support(head(features), support_y, None)
    """
    return F.cross_entropy(support_logits, support_y)


def finetune_on_support(
    backbone: nn.Module,
    make_head: HeadBuilder,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    ways: int,
    config: FinetuneConfig,
    loss_fn: SupportLoss = cross_entropy_on_support,
    uses_query: bool = False,
) -> torch.Tensor:
    """Train a new head (and a copy of ``backbone``) on one support set; return query logits.

    ``loss_fn`` receives the query logits only when ``uses_query`` (transductive
    losses). ``backbone`` itself is never modified.

    Example::

        logits = finetune_on_support(backbone, zero_linear_head, support_x, support_y,
                                     query_x, ways=5, config=FinetuneConfig())
    """
    device = device_of(backbone)
    support_x, query_x = support_x.to(device), query_x.to(device)
    support_y = support_y.to(device).long()
    support_features = embed(backbone, support_x)
    head = make_head(support_features, support_y, ways)
    groups = [{"params": list(head.parameters()), "lr": config.head_lr}]
    if config.train_backbone:
        encoder = copy.deepcopy(backbone)
        # Eval mode: BatchNorm keeps its pretraining statistics, which 5-25 images
        # could not estimate; the weights still adapt.
        encoder.eval()
        groups.append({"params": list(encoder.parameters()), "lr": config.backbone_lr})
        support_in, query_in = support_x, query_x
    else:
        encoder = nn.Identity()
        support_in, query_in = support_features, embed(backbone, query_x)
    optimizer = (torch.optim.SGD if config.optimizer == "sgd" else torch.optim.Adam)(groups)
    with torch.enable_grad():
        for _ in range(config.steps):
            query_logits = head(encoder(query_in)) if uses_query else None
            loss = loss_fn(head(encoder(support_in)), support_y, query_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return head(encoder(query_in))


class Finetune(TestTimeMethod):
    """The pretrained backbone fine-tuned on each support set with a new linear head.

    Example::

        method = Finetune(FinetuneConfig())
        method.fit(context)  # takes a copy of context.pretrained_backbone()
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "finetune"

    def __init__(self, config: FinetuneConfig | None = None):
        super().__init__()
        self.config = config or FinetuneConfig()

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        logits = finetune_on_support(
            self.frozen_backbone(), zero_linear_head, support_x, support_y, query_x, ways, self.config
        )
        return logits.to(query_x.device)
