"""A few-shot head for any feature extractor: its width found for the user, started at zero.

A learn2learn script builds its classifier by hand (``nn.Linear(width, ways)`` with PyTorch's
default initialisation). On top of frozen pretrained features that is a trap: the features
of a pretrained backbone are large (norms of 5-10 are usual), so a randomly initialised head
starts with huge logits, and a few-shot inner loop at MAML's learning rates collapses to chance
accuracy without any error. :func:`new_head` starts at zero (uniform predictions, gradients
that point at the class means), and :func:`feature_width` reads or measures the width.

Example::

    from mtl_plugin import SSAdapter, new_head
    features = SSAdapter(pretrained_backbone)
    head = new_head(features, ways=5)              # nn.Linear(width, 5), zero weights and bias
    maml = l2l.algorithms.MAML(head, lr=0.5)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["declared_width", "feature_width", "new_head"]

# Large enough for every stem and pooling of the usual backbones (ResNets need 32 px or more).
_PROBE_SIZE = 84


def declared_width(model: nn.Module) -> Optional[int]:
    """The int ``feature_dim`` of ``model``, or of the ``backbone`` it wraps (as
    :class:`~mtl_plugin.ss.SSAdapter` does); ``None`` if neither declares one.

    Example::

        declared_width(SSAdapter(conv4(in_channels=1, image_size=28)))   # 64
    """
    for module in (model, getattr(model, "backbone", None)):
        if module is not None and isinstance(getattr(module, "feature_dim", None), int):
            return module.feature_dim
    return None


def feature_width(model: nn.Module, sample: Optional[torch.Tensor] = None) -> int:
    """The width of the flat features ``model`` returns.

    Read from an int ``feature_dim`` attribute (of ``model`` or of the ``backbone`` it wraps,
    as :class:`~mtl_plugin.ss.SSAdapter` does); otherwise measured by one forward pass, in
    eval mode and without gradients, on ``sample`` or on zeros shaped for the model's first
    layer (``(2, C, 84, 84)`` for a first ``nn.Conv2d`` of C input channels, ``(2, F)`` for a
    first ``nn.Linear`` of F inputs).

    Args:
        model: a feature extractor, ``(B, ...) -> (B, width)``.
        sample: a batch of inputs the model accepts, when zeros of a guessed shape will not do.

    Returns:
        The feature width.

    Raises:
        ValueError: the model has no ``feature_dim``, no first ``nn.Conv2d``/``nn.Linear`` to
            shape a probe by and no ``sample``, or its output is not ``(B, width)``.

    Example::

        width = feature_width(torchvision.models.resnet18())     # 1000: its classifier's outputs
    """
    declared = declared_width(model)
    if declared is not None:
        return declared
    parameter = next(model.parameters(), None)
    if sample is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if first is None:
            raise ValueError(f"cannot tell the feature width of {type(model).__name__}: give it an int "
                             f"attribute feature_dim, or pass sample= (a batch it accepts)")
        if isinstance(first, nn.Conv2d):
            sample = torch.zeros(2, first.in_channels, _PROBE_SIZE, _PROBE_SIZE)
        else:
            sample = torch.zeros(2, first.in_features)
    if parameter is not None:
        sample = sample.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(sample)
    finally:
        model.train(was_training)
    if output.dim() != 2:
        raise ValueError(f"{type(model).__name__} returns features of shape {tuple(output.shape)}, not "
                         f"(batch, width): flatten them (e.g. end the model in nn.Flatten())")
    return output.shape[1]


def new_head(model: nn.Module, ways: int, sample: Optional[torch.Tensor] = None) -> nn.Linear:
    """A ``ways``-way linear head for ``model``'s features, with zero weights and bias.

    Args:
        model: the feature extractor the head goes on (see :func:`feature_width`).
        ways: classes per task.
        sample: a batch the model accepts, if its width must be measured on real inputs.

    Returns:
        ``nn.Linear(feature_width(model), ways)`` on the model's device, all zeros: its first
        predictions are uniform and its first gradient step moves each class row towards that
        class's mean feature, whatever the scale of the features.

    Raises:
        ValueError: ``ways`` < 2, or the width cannot be found (see :func:`feature_width`).

    Example::

        head = new_head(SSAdapter(backbone), ways=5)
    """
    if ways < 2:
        raise ValueError(f"ways={ways}: a few-shot head needs 2 or more classes")
    head = nn.Linear(feature_width(model, sample), ways)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    parameter = next(model.parameters(), None)
    return head.to(parameter.device) if parameter is not None else head
