"""Transductive fine-tuning with a cosine classifier (Dhillon et al., ICLR 2020).

After pretraining, each task gets a cosine-similarity classifier whose weights
start at the L2-normalised class means of the support features, bias 0. It is
trained on the support set with cross-entropy plus the mean entropy of the
query predictions, which pushes the decision boundaries away from the
(unlabelled) queries.

Example::

    method = CosineFinetune(CosineFinetuneConfig.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.bench.methods.finetune import Finetune, FinetuneConfig, finetune_on_support
from mtl_plugin.prototypes import class_prototypes

__all__ = [
    "CosineClassifier",
    "CosineFinetune",
    "CosineFinetuneConfig",
    "mean_entropy",
    "transductive_loss",
]


class CosineClassifier(nn.Module):
    """Logits ``scale * cos(feature, weight_k) + bias_k``.

    Example::

        head = CosineClassifier.from_support(features, labels, ways=5, scale=10.0)
        logits = head(query_features)  # (n_query, 5)
    """

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(len(weight), dtype=weight.dtype, device=weight.device))
        self.scale = scale

    @classmethod
    def from_support(cls, features: torch.Tensor, labels: torch.Tensor, ways: int, scale: float) -> CosineClassifier:
        """Weights = L2-normalised class means of ``features``, bias 0.

        Example::

            head = CosineClassifier.from_support(embed(backbone, support_x), support_y, 5, 10.0)
        """
        return cls(F.normalize(class_prototypes(features, labels, ways), dim=1), scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        return self.scale * cosine + self.bias


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The Shannon entropy (nats) of ``softmax(logits)``, averaged over rows.

    Example::

        mean_entropy(torch.zeros(3, 5))  # log(5): uniform predictions
    """
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


def transductive_loss(
    support_logits: torch.Tensor,
    support_y: torch.Tensor,
    query_logits: torch.Tensor | None,
    entropy_weight: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy on the support set + ``entropy_weight`` x mean entropy on the queries.

    Example::

        loss = transductive_loss(head(support_features), support_y, head(query_features))
    """
    if query_logits is None:
        raise ValueError("transductive_loss needs the query logits; call it with uses_query=True")
    return F.cross_entropy(support_logits, support_y) + entropy_weight * mean_entropy(query_logits)


@dataclass
class CosineFinetuneConfig(FinetuneConfig):
    """Dhillon et al.'s schedule: Adam, lr 5e-5, 25 full-batch epochs, whole network.

    ``scale`` (the inverse temperature of the cosine logits) is ours: cosines lie
    in [-1, 1], so without it the softmax could not become confident.

    Example::

        config = CosineFinetuneConfig(scale=5.0, entropy_weight=0.5)
    """

    steps: int = 25
    head_lr: float = 5e-5
    backbone_lr: float = 5e-5
    train_backbone: bool = True
    optimizer: str = "adam"
    scale: float = 10.0
    entropy_weight: float = 1.0

    @classmethod
    def quick(cls) -> CosineFinetuneConfig:
        """Frozen backbone, classifier trained on cached features: milliseconds per task on CPU.

        The lr stays small, as in Dhillon et al.: at 0.01 the entropy term collapses the
        queries onto few classes. Measurements: docs/profiles.md#cosine-finetune
        """
        return cls(steps=50, head_lr=1e-3, train_backbone=False)


class CosineFinetune(Finetune):
    """Transductive fine-tuning of a cosine classifier on the pretrained backbone.

    Example::

        method = CosineFinetune(CosineFinetuneConfig())
        method.fit(context)  # takes a copy of context.pretrained_backbone()
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "cosine-finetune"
    transductive: ClassVar[bool] = True

    def __init__(self, config: CosineFinetuneConfig | None = None):
        super().__init__(config or CosineFinetuneConfig())

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        config = self.config
        logits = finetune_on_support(
            self.frozen_backbone(),
            partial(CosineClassifier.from_support, scale=config.scale),
            support_x,
            support_y,
            query_x,
            ways,
            config,
            loss_fn=partial(transductive_loss, entropy_weight=config.entropy_weight),
            uses_query=True,
        )
        return logits.to(query_x.device)
