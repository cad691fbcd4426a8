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

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.errors import NonFiniteLossError
from mtl_plugin.prototypes import class_prototypes
from mtl_plugin.ss import SSAdapter

__all__ = [
    "INNER_DIVERGENCE_FACTOR",
    "AdaptedHead",
    "CosineClassifier",
    "SSHead",
    "adapt_head",
    "declared_width",
    "feature_width",
    "new_head",
    "prototype_head",
]

# Gradient descent on the inner loop's convex loss lowers the support loss at any stable
# inner_lr; ending ten times above where it started (or above chance level) is divergence.
INNER_DIVERGENCE_FACTOR = 10.0

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


@dataclass
class AdaptedHead:
    """A linear head as plain tensors, ``logits = features @ W.T + b``: the start or the end of an inner loop.

    Example::

        head = learner.adapt(support_x, support_y)
        logits = head(learner.features(query_x))
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


def prototype_head(features: torch.Tensor, labels: torch.Tensor, metric: torch.Tensor, ways: int) -> AdaptedHead:
    """The head at a support set's class means c_k, weighted per feature by ``metric`` (d).

    W_k = 2·(d⊙c_k)/s², b_k = -(d⊙c_k)·c_k/s², with s² the support features' mean squared
    distance to their mean (a constant of the task): before any inner step its logits rank the
    classes by nearest class mean under d, whatever the order of the task's labels.
    Differentiable with respect to ``metric`` and ``features``.

    Args:
        features: support features ``(n, feature_dim)``.
        labels: their labels ``0..ways-1``.
        metric: d, ``(feature_dim,)``.
        ways: the task's classes.

    Returns:
        The head a task's inner loop starts from.

    Raises:
        ValueError: a class without support samples (from ``class_prototypes``).

    Example::

        head = prototype_head(features, labels, torch.ones(features.shape[1]), ways=5)
    """
    means = class_prototypes(features, labels, ways)
    # Raw squared distances grow with the features' magnitude: on a well-pretrained Conv4 the first
    # query losses were near 17, and their gradients wrecked Φ while d was still shrinking. Dividing
    # by the support set's spread (label-free, a constant of the task) starts every task at logit
    # margins of a few units, whatever the features' scale.
    spread = (features - features.mean(dim=0)).pow(2).sum(dim=1).mean().detach().clamp_min(1e-8)
    weighted = metric * means / spread
    return AdaptedHead(2 * weighted, -(weighted * means).sum(dim=1))


def adapt_head(
    start: AdaptedHead,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    *,
    differentiable: bool = True,
    first_order: bool = False,
) -> AdaptedHead:
    """``steps`` steps of gradient descent at ``lr`` on the head's support cross-entropy.

    Differentiable: the result keeps its graph to ``start`` and ``features``, through the
    inner-loop gradients too unless ``first_order``. Otherwise a detached fine-tuning.

    Args:
        start: the head to start from.
        features: support features ``(n, feature_dim)``.
        labels: their labels.
        steps: gradient steps.
        lr: the inner learning rate.
        differentiable: keep the graph for a meta-gradient.
        first_order: drop the second-order terms.

    Returns:
        The adapted head.

    Raises:
        NonFiniteLossError: the loop diverged: its support loss was not finite at the start, or
            ended non-finite or above ``INNER_DIVERGENCE_FACTOR`` x max(its start, ln(ways))
            (``settings == ("inner_lr",)``); a head adapted so would score at chance.

    Example::

        head = adapt_head(prototype_head(features, labels, d, 5), features, labels, steps=20, lr=0.01)
    """
    weight, bias = start.weight, start.bias
    if not differentiable:
        weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    first_loss = None
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(features, weight, bias), labels)
        first_loss = loss.detach() if first_loss is None else first_loss
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias), create_graph=not first_order)
        weight = weight - lr * grad_w
        bias = bias - lr * grad_b
        if not differentiable:
            weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    if first_loss is not None:
        # Test-time adaptation too: a head adapted by a diverged loop scores at chance, a wrong number.
        with torch.no_grad():
            last_loss = F.cross_entropy(F.linear(features, weight, bias), labels)
        first, last = torch.stack([first_loss, last_loss]).tolist()
        if not math.isfinite(first):
            raise NonFiniteLossError(
                f"the support loss is {first} before any inner step: the features or θ are not finite"
            )
        if not math.isfinite(last) or last > INNER_DIVERGENCE_FACTOR * max(first, math.log(weight.shape[0])):
            raise NonFiniteLossError(
                f"the inner loop diverged: the support loss went from {first:.3g} to {last:.3g} in {steps} "
                f"steps at inner_lr {lr:.3g}",
                settings=("inner_lr",),
            )
    return AdaptedHead(weight, bias)


class CosineClassifier(nn.Module):
    """Logits as scaled cosines between the features and one learned weight per class (Baseline++).

    A linear head's logits grow with the feature norm and let a few classes dominate the
    gradient; cosines put every class on one scale, which Chen et al. (ICLR 2019) found to learn
    features that transfer better from a shallow backbone. The scale (a temperature, learned)
    starts at 10: with cosines in [-1, 1], logit gaps of a few units are reachable, as softmax
    over hundreds of classes needs. In this project's pretraining (Conv4, SGD at lr 0.1) it gave a
    weaker embedding than the linear head on three data sets (docs/pretraining.md).

    Args:
        width: the feature width.
        classes: the number of classes.

    Example::

        head = CosineClassifier(64, 960)
        logits = head(torch.randn(8, 64))  # (8, 960), each within ±head.scale
    """

    def __init__(self, width: int, classes: int):
        super().__init__()
        # nn.Linear's own initialisation, for the same random start of its directions.
        self.weight = nn.Parameter(nn.Linear(width, classes, bias=False).weight.detach().clone())
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
