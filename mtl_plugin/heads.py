"""A few-shot head for any feature extractor: its width found for the user, started at zero.

A learn2learn script builds its classifier by hand (``nn.Linear(width, ways)`` with PyTorch's
default initialisation). On top of frozen pretrained features that is a trap: the features
of a pretrained backbone are large (norms of 5-10 are usual), so a randomly initialised head
starts with huge logits, and a few-shot inner loop at MAML's learning rates collapses to chance
accuracy without any error. :func:`new_head` starts at zero (uniform predictions, gradients
that point at the class means), and :func:`feature_width` reads or measures the width.
:class:`SSHead` is such a head with its SS features inside, in place of a learn2learn model.

Example::

    from mtl_plugin import SSAdapter, new_head
    features = SSAdapter(pretrained_backbone)
    head = new_head(features, ways=5)              # nn.Linear(width, 5), zero weights and bias
    maml = l2l.algorithms.MAML(head, lr=0.5)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mtl_plugin.ss import SSAdapter

__all__ = ["SSHead", "declared_width", "feature_width", "new_head"]

# The state_dict prefix of the SS parameters an SSHead saves beside its head.
_SS_PREFIX = "ss."

# Large enough for every stem and pooling of the usual backbones (ResNets need 32 px or more).
_PROBE_SIZE = 84


def declared_width(model: nn.Module) -> int | None:
    """The int ``feature_dim`` of ``model``, or of the ``backbone`` it wraps (as
    :class:`~mtl_plugin.ss.SSAdapter` does); ``None`` if neither declares one.

    Example::

        declared_width(SSAdapter(conv4(in_channels=1, image_size=28)))   # 64
    """
    for module in (model, getattr(model, "backbone", None)):
        if module is not None and isinstance(getattr(module, "feature_dim", None), int):
            return module.feature_dim
    return None


def feature_width(model: nn.Module, sample: torch.Tensor | None = None) -> int:
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
            raise ValueError(
                f"cannot tell the feature width of {type(model).__name__}: give it an int "
                f"attribute feature_dim, or pass sample= (a batch it accepts)"
            )
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
        raise ValueError(
            f"{type(model).__name__} returns features of shape {tuple(output.shape)}, not "
            f"(batch, width): flatten them (e.g. end the model in nn.Flatten())"
        )
    return output.shape[1]


def new_head(model: nn.Module, ways: int, sample: torch.Tensor | None = None) -> nn.Linear:
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


class SSHead(nn.Module):
    """A zero-started linear head on SS features, for ``l2l.algorithms.MAML`` to adapt alone.

    MTL adapts the head in the inner loop and learns SS's Φ in the outer loop only. An
    ``SSHead`` runs ``head(features(x))`` but holds ``features`` (an :class:`SSAdapter`) as a
    plain attribute, not a submodule: its ``parameters()``, which ``MAML`` clones and adapts,
    are the head's alone, every clone shares the one ``features``, and the meta-gradient of
    each task reaches Φ through it. So it replaces a learn2learn script's model
    (``l2l.vision.models.OmniglotFC(...)``) and ``fast_adapt`` stays as it is. Give Φ to the
    outer optimiser with :meth:`ss_parameters`. ``to()``, ``cuda()``, ``train()`` and
    ``eval()`` reach the features too, and ``state_dict()`` holds the head and Φ (keys
    ``ss.<layer>.scale`` and ``ss.<layer>.shift``), not the frozen backbone. The backbone runs
    on every call: ``fast_adapt`` with ``s`` adaptation steps runs it ``s + 1`` times a task.

    Args:
        backbone: a pretrained feature extractor, wrapped here in an :class:`SSAdapter` with
            its defaults (its weights frozen in place), or an :class:`SSAdapter` you built
            (another ``granularity`` or ``layers``).
        ways: classes per task.
        sample: a batch the backbone accepts, if its width must be measured on real inputs.

    Raises:
        TypeError: ``backbone`` is not an ``nn.Module``.
        ValueError: ``ways`` < 2, the width cannot be found (see :func:`feature_width`), or the
            backbone has no layer SS adapts (see :class:`SSAdapter`).

    Example::

        model = SSHead(pretrain(get_benchmark("kanji"), PretrainConfig.quick()), ways=5)
        maml = l2l.algorithms.MAML(model, lr=0.5)
        opt = torch.optim.Adam([*maml.parameters(), *model.ss_parameters()], lr=0.003)
    """

    def __init__(self, backbone: nn.Module, ways: int, sample: torch.Tensor | None = None):
        super().__init__()
        features = backbone if isinstance(backbone, SSAdapter) else SSAdapter(backbone)
        # object.__setattr__ keeps nn.Module from registering it: MAML must not adapt Φ.
        object.__setattr__(self, "features", features)
        self.head = new_head(features, ways, sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def ss_parameters(self) -> Iterator[nn.Parameter]:
        """The features' Φ1 and Φ2: what the outer optimiser learns beside the head's initialisation."""
        return self.features.ss_parameters()

    def train(self, mode: bool = True) -> SSHead:
        self.features.train(mode)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # to(), cuda(), half() ... move the features with the head.
        self.features._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, parameter in self.features.named_ss_parameters():
            destination[prefix + _SS_PREFIX + name] = parameter if keep_vars else parameter.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = prefix + _SS_PREFIX
        parameters = {ours + name: parameter for name, parameter in self.features.named_ss_parameters()}
        with torch.no_grad():
            for key, parameter in parameters.items():
                if key not in state_dict:
                    missing_keys.append(key)
                elif state_dict[key].shape != parameter.shape:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape "
                        f"{tuple(state_dict[key].shape)}, the shape here is {tuple(parameter.shape)}"
                    )
                else:
                    parameter.copy_(state_dict[key])
        unexpected_keys.extend(key for key in state_dict if key.startswith(ours) and key not in parameters)
        rest = {key: value for key, value in state_dict.items() if not key.startswith(ours)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"features={type(self.features.backbone).__name__} under SS (not adapted by MAML)"
