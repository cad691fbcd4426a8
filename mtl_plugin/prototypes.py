"""Nearest-class-mean primitives shared by ProtoNets, fine-tuning and pretraining validation.

Example::

    from mtl_plugin.prototypes import class_prototypes, embed, prototype_logits
    prototypes = class_prototypes(embed(backbone, support_x), support_y, ways=5)
    logits = prototype_logits(embed(backbone, query_x), prototypes)
    predictions = logits.argmax(1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DISTANCES", "class_prototypes", "device_of", "embed", "prototype_logits"]

DISTANCES = ("squared_euclidean", "cosine")


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s parameters (CPU for a module without any).

    Example::

        images = images.to(device_of(backbone))
    """
    parameter = next(module.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def embed(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features of ``images`` from ``backbone`` in eval mode, without gradients.

    Example::

        features = embed(context.pretrained_backbone(), support_x)  # (N, feature_dim)
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return backbone(images.to(device_of(backbone)))
    finally:
        backbone.train(was_training)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The mean feature of each class 0..ways-1, shape (ways, feature_dim).

    Example::

        prototypes = class_prototypes(embed(backbone, support_x), support_y, ways=5)
    """
    labels = labels.to(features.device).long()
    counts = torch.bincount(labels, minlength=ways)
    if len(counts) != ways or bool((counts == 0).any()):
        raise ValueError(
            f"support labels must cover every class 0..{ways - 1} (got counts {counts.tolist()}); "
            f"pass ways equal to the number of classes in the support set"
        )
    sums = torch.zeros(ways, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return sums / counts.unsqueeze(1).to(features.dtype)


def prototype_logits(
    query_features: torch.Tensor, prototypes: torch.Tensor, distance: str = "squared_euclidean"
) -> torch.Tensor:
    """Logits (n_query, ways): negative squared Euclidean distance, or cosine similarity.

    Example::

        logits = prototype_logits(embed(backbone, query_x), prototypes)
        predictions = logits.argmax(1)
    """
    if distance == "squared_euclidean":
        return -torch.cdist(query_features, prototypes).pow(2)
    if distance == "cosine":
        return F.normalize(query_features, dim=1) @ F.normalize(prototypes, dim=1).T
    raise ValueError(f"distance={distance!r} is unknown; use one of {DISTANCES}")
