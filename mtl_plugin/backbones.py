"""Feature backbones for few-shot learning: keyword-only builders in a registry, torchvision style.

Every builder returns an ``nn.Module`` with an int attribute ``feature_dim``.
With ``num_classes=0`` (the default) it maps images ``(B, C, H, W)`` to flat
features ``(B, feature_dim)``; with ``num_classes > 0`` it ends in a linear
classifier, reachable as ``model.head``, for the pretraining phase. Weights are
passed explicitly (a state dict or a path); nothing is downloaded.
:func:`build_backbone` looks a name up in the registry (:func:`list_backbones`);
:func:`register_backbone` adds a user's own builder under a name, so the
``mtl`` commands and :func:`~mtl_plugin.training.pretrain.pretrain` can build it.

Example::

    from mtl_plugin.backbones import build_backbone
    net = build_backbone("resnet12", in_channels=3)           # 640-d features
    small = build_backbone("resnet18-small", in_channels=1)  # for 28-32 px images
    features = net(torch.randn(2, 3, 84, 84))                # (2, 640)
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from mtl_plugin.errors import DataError, UsageError

__all__ = [
    "ResNet12",
    "Conv4",
    "resnet12",
    "resnet12_half",
    "conv4",
    "small_input_resnet",
    "torchvision_backbone",
    "build_backbone",
    "check_backbone",
    "list_backbones",
    "load_weights",
    "register_backbone",
    "BACKBONES",
]

Weights = str | os.PathLike | dict | None


def _head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()


def _in_format_of(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in ``weight``'s memory format: channels-last if the model's convs are (as built).

    Conv4 and ResNet-12 are built channels-last, weights and activations: oneDNN's convolutions,
    batch norm and max-pooling run faster so on CPU, and cuDNN's on GPU (benchmarks/memory_format.py;
    NCHW max-pooling alone took 38 % of a Conv4 forward at 28 px). A model converted back with
    ``.to(memory_format=torch.contiguous_format)`` runs as torch's default, NCHW, as the official
    code does. ``weight`` must have more than one input channel, or both formats describe it.
    Only the memory layout changes: the same values, up to float rounding.
    """
    if x.dim() == 4 and not weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


class _ResNet12Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.relu = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2, ceil_mode=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.relu(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """The standard few-shot ResNet-12 (TADAM, MetaOptNet, RFS): four residual blocks of
    three 3x3 convs with LeakyReLU(0.1) and a 1x1 shortcut, each followed by 2x2 max-pooling,
    then global average pooling. DropBlock is left out (it only regularises pretraining)."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] = (64, 160, 320, 640),
        num_classes: int = 0,
    ):
        super().__init__()
        blocks, previous = [], in_channels
        for width in channels:
            blocks.append(_ResNet12Block(previous, width))
            previous = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = previous
        self.head = _head(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.layers(_in_format_of(x, self.layers[0].conv2.weight))).flatten(1))


class Conv4(nn.Module):
    """Four blocks of 3x3 conv (``hidden`` filters), batch norm, ReLU and 2x2 max-pooling
    (Vinyals et al.; Snell et al.; Finn et al.), flattened: 64-d at 28 px, 1600-d at 84 px.

    Each block pools before its ReLU: ReLU is monotone and exact, so the two orders give the
    same outputs and gradients to the bit, and the ReLU then runs on a quarter of the values.
    """

    def __init__(self, in_channels: int = 3, hidden: int = 64, image_size: int = 84, num_classes: int = 0):
        super().__init__()
        layers, previous, side = [], in_channels, image_size
        for _ in range(4):
            layers += [
                nn.Conv2d(previous, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden),
                nn.MaxPool2d(2),
                nn.ReLU(inplace=True),
            ]
            previous, side = hidden, side // 2
        if side < 1:
            raise UsageError(
                f"image size {image_size} px is too small for conv4 (four 2x2 poolings): use image_size=16 or more"
            )
        self.layers = nn.Sequential(*layers)
        self.feature_dim = hidden * side * side
        self.head = _head(self.feature_dim, num_classes)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(_in_format_of(x, self.layers[4].weight)).flatten(1))


def resnet12(
    *,
    in_channels: int = 3,
    num_classes: int = 0,
    weights: Weights = None,
    channels: tuple[int, ...] = (64, 160, 320, 640),
) -> ResNet12:
    """ResNet-12, by default with the widths 64-160-320-640 of MTL and later work (640-d features).

    Args:
        in_channels: image channels.
        num_classes: outputs of a linear head (``model.head``); 0 for features only.
        weights: a state dict of this architecture, or a path to one.
        channels: the four blocks' widths (the last one is the feature width).

    Returns:
        The network, with ``feature_dim`` ``channels[-1]``.

    Raises:
        DataError: ``weights`` that do not fit the architecture.

    Example::

        net = resnet12()
        features = net(torch.randn(5, 3, 84, 84))  # (5, 640)
    """
    model = ResNet12(in_channels=in_channels, channels=channels, num_classes=num_classes)
    load_weights(model, weights)
    return model


def resnet12_half(*, in_channels: int = 3, num_classes: int = 0, weights: Weights = None) -> ResNet12:
    """ResNet-12 at half width, 32-80-160-320 (320-d features): the same topology as
    :func:`resnet12` at a quarter of its compute, for the CPU-sized deep bench.

    3.1 M weights on one input channel (Conv4 at 28 px: 0.11 M); a pretraining step costs
    about a quarter of the full width's (docs/deep.md).

    Example::

        net = resnet12_half(in_channels=1)
        features = net(torch.randn(5, 1, 28, 28))  # (5, 320)
    """
    return resnet12(in_channels=in_channels, num_classes=num_classes, weights=weights, channels=(32, 80, 160, 320))


def conv4(
    *, in_channels: int = 3, hidden: int = 64, num_classes: int = 0, image_size: int = 84, weights: Weights = None
) -> Conv4:
    """Conv4 with ``hidden`` filters per layer; ``feature_dim`` depends on ``image_size``.

    Args:
        in_channels: image channels.
        hidden: filters per conv layer.
        num_classes: outputs of a linear head (``model.head``); 0 for features only.
        image_size: image side in pixels (fixes the flattened feature width).
        weights: a state dict of this architecture, or a path to one.

    Returns:
        The network, with ``feature_dim = hidden * (image_size // 16) ** 2``.

    Raises:
        UsageError: ``image_size`` below 16 px.
        DataError: ``weights`` that do not fit the architecture.

    Example::

        net = conv4(in_channels=1, image_size=28)
        features = net(torch.randn(5, 1, 28, 28))  # (5, 64)
    """
    model = Conv4(in_channels=in_channels, hidden=hidden, image_size=image_size, num_classes=num_classes)
    load_weights(model, weights)
    return model


def _read_weights(weights: Weights) -> dict | None:
    if weights is None or isinstance(weights, dict):
        return weights
    return torch.load(weights, map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Load ``weights`` (a state dict or a path to one; ``None``: nothing) into ``model``, checked first.

    Raises:
        DataError: missing or unexpected keys, or tensors of another shape than ``model``'s.

    Example::

        load_weights(resnet12_half(in_channels=1), "runs/pre/backbone.pt")
    """
    state = _read_weights(weights)
    if state is None:
        return
    own = model.state_dict()
    misshapen = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or misshapen:
        raise DataError(
            f"weights do not fit {type(model).__name__}: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, other shapes {misshapen[:5]}; pass a state dict saved from the same architecture"
        )
    model.load_state_dict(state)


def _replace_classifier(model: nn.Module, num_classes: int) -> int:
    """Swap the last ``nn.Linear`` for ``num_classes`` outputs (or none); return its input width."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    name = linears[-1]
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    feature_dim = getattr(parent, attribute).in_features
    setattr(parent, attribute, _head(feature_dim, num_classes))
    return feature_dim


def torchvision_backbone(
    arch: str,
    *,
    in_channels: int = 3,
    num_classes: int = 0,
    small_input: bool = False,
    weights: Weights = None,
) -> nn.Module:
    """Any torchvision classification model as a feature backbone.

    ``small_input=True`` (ResNet family only) swaps the 7x7 stride-2 stem and the
    max-pool for a 3x3 stride-1 conv, for 28-32 px images; ``in_channels != 3``
    also gives a new stem. ``weights`` must hold the stem the model is built
    with: weights of the standard 7x7 RGB stem are refused for a new stem rather
    than silently dropped (load them with ``small_input=False``, or pass weights
    saved from the small-input model, e.g. by ``mtl pretrain``).

    Args:
        arch: a torchvision classification model name (``torchvision.models.list_models()``).
        in_channels: image channels.
        num_classes: outputs of the replaced classifier; 0 for features only.
        small_input: the 3x3 stride-1 stem without max-pool (ResNets only).
        weights: a state dict of the full model as built (stem and classifier included), or a path to one.

    Returns:
        The network, with ``feature_dim`` the classifier's input width.

    Raises:
        UsageError: an unknown ``arch``; ``small_input`` or ``in_channels != 3`` for a non-ResNet;
            ``weights`` of the standard stem given with a new stem.
        DataError: ``weights`` that do not fit the architecture.

    Example::

        net = torchvision_backbone("resnet50", weights="resnet50_meta_train.pt")
        features = net(torch.randn(2, 3, 224, 224))  # (2, 2048)
    """
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as error:
        raise UsageError(f"unknown torchvision architecture {arch!r}; see torchvision.models.list_models()") from error
    state = _read_weights(weights)
    new_stem = small_input or in_channels != 3
    if state is not None and not new_stem:
        load_weights(model, state)
    if new_stem:
        if not isinstance(model, torchvision.models.ResNet):
            raise UsageError(
                f"small_input and in_channels != 3 are supported for torchvision ResNets only, not {arch!r}"
            )
        stem = model.conv1
        if small_input:
            model.conv1 = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        else:
            model.conv1 = nn.Conv2d(in_channels, stem.out_channels, 7, stride=2, padding=3, bias=False)
        if state is not None:
            if "conv1.weight" in state and state["conv1.weight"].shape != model.conv1.weight.shape:
                raise UsageError(
                    f"the weights hold a {tuple(state['conv1.weight'].shape)} stem, but {arch} is built with a new "
                    f"{tuple(model.conv1.weight.shape)} stem (small_input={small_input}, in_channels={in_channels}): "
                    f"its pretrained stem would be dropped; build with small_input=False and in_channels=3 to use "
                    f"these weights, or pass weights saved from the small-input model"
                )
            load_weights(model, state)
    model.feature_dim = _replace_classifier(model, num_classes)
    return model


def small_input_resnet(
    arch: str = "resnet18", *, in_channels: int = 3, num_classes: int = 0, weights: Weights = None
) -> nn.Module:
    """A torchvision ResNet with a 3x3 stride-1 stem and no max-pool, for 28-32 px images.

    Example::

        net = small_input_resnet("resnet18", in_channels=1)
        features = net(torch.randn(4, 1, 28, 28))  # (4, 512)
    """
    return torchvision_backbone(
        arch, in_channels=in_channels, num_classes=num_classes, small_input=True, weights=weights
    )


# name -> (builder, smallest image side or None); filled by register_backbone.
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int | None]] = {}


def register_backbone(name: str, *, min_image_size: int | None = None) -> Callable:
    """Register a keyword-only builder under ``name`` for :func:`build_backbone` and the ``mtl`` commands.

    The builder takes ``in_channels``, ``num_classes`` and ``weights`` (and ``image_size`` if its
    feature width depends on it) as keywords and returns a module with an int ``feature_dim``.

    Args:
        name: the name to build it by (``--backbone NAME``).
        min_image_size: the smallest image side it accepts, checked before any data is loaded.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        UsageError: ``name`` is registered already.

    Example::

        @register_backbone("tiny")
        def tiny(*, in_channels=3, num_classes=0, weights=None):
            return conv4(in_channels=in_channels, hidden=16, num_classes=num_classes, weights=weights)
    """

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise UsageError(f"a backbone named {name!r} is registered already; pick another name")
        _REGISTRY[name] = (builder, min_image_size)
        return builder

    return register


# Four 2x2 max-poolings with floor rounding: 16 px is the smallest side that leaves one pixel.
register_backbone("resnet12", min_image_size=16)(resnet12)
register_backbone("resnet12-half", min_image_size=16)(resnet12_half)
register_backbone("conv4", min_image_size=16)(conv4)


def list_backbones() -> list[str]:
    """The registered backbone names; ``<torchvision resnet>-small`` and torchvision model names build too.

    Returns:
        The names :func:`build_backbone` finds in the registry, in registration order.

    Example::

        print(list_backbones())  # ['resnet12', 'resnet12-half', 'conv4']
    """
    return list(_REGISTRY)


BACKBONES = (*_REGISTRY, "resnet18-small", "<any torchvision.models name>")


@functools.cache
def _torchvision_misfit(arch: str, image_size: int) -> str | None:
    """Why torchvision's ``arch`` cannot take ``image_size`` px images, or ``None``.

    Built and run on the meta device: shapes only, no memory and no arithmetic (a fraction of a
    second), so that a ViT's fixed input size or a pooling to nothing is found before data loads.
    """
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None).eval()
            model(torch.empty(1, 3, image_size, image_size))
    except NotImplementedError:
        # An operation without a meta kernel: the size cannot be checked before building.
        return None
    except (AssertionError, RuntimeError, ValueError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def check_backbone(name: str, image_size: int | None = None, option: str = "image_size") -> None:
    """Check that ``name`` is a backbone :func:`build_backbone` knows and fits ``image_size`` px.

    Cheap (nothing is built), so command lines call it before loading data or training.

    Args:
        name: a registered name (``resnet12``, ``conv4``, ...), ``<torchvision resnet>-small``
            or a torchvision classification model name.
        image_size: the image side the backbone will see; ``None`` skips the size check.
        option: the argument that gave ``image_size``, for the messages (``mtl`` passes ``--image-size``).

    Raises:
        UsageError: an unknown name, or images too small for the backbone's poolings, or of a
            size a torchvision model does not take (a ViT's fixed size; checked on the meta device).

    Example::

        check_backbone("resnet12", image_size=84)
    """
    classifiers = torchvision.models.list_models(module=torchvision.models)
    base = name[: -len("-small")] if name.endswith("-small") else name
    if name not in _REGISTRY and base not in classifiers:
        raise UsageError(
            f"unknown backbone {name!r}, not registered ({', '.join(_REGISTRY)}) and an unknown torchvision "
            f"architecture: use a registered one, a torchvision ResNet with -small (e.g. resnet18-small) or a "
            f"torchvision classification model (e.g. resnet18)"
        )
    minimum = _REGISTRY[name][1] if name in _REGISTRY else None
    if image_size is not None and minimum is not None and image_size < minimum:
        raise UsageError(
            f"image size {image_size} px is too small for {name} (four 2x2 poolings): use {option} {minimum} or more"
        )
    if image_size is not None and name not in _REGISTRY and base == name:
        misfit = _torchvision_misfit(name, image_size)
        if misfit is not None:
            # torchvision's own reason names the size a ViT is built for ("Expected 224 but got 16").
            raise UsageError(
                f"{name} does not take images of {image_size} px ({misfit}): pass an {option} it "
                f"takes, or another backbone"
            )


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 0,
    image_size: int = 84,
    weights: Weights = None,
) -> nn.Module:
    """Build a backbone by name: a registered one (``resnet12``, ``conv4``, or a user's, see
    :func:`register_backbone`), ``<torchvision resnet>-small`` (e.g. ``resnet18-small``) or any
    torchvision model name.

    Args:
        name: the backbone's name.
        in_channels: image channels.
        num_classes: outputs of a linear head; 0 for features only.
        image_size: image side in pixels, for backbones whose feature width depends on it.
        weights: a state dict for the model as built, or a path to one; nothing is downloaded.

    Returns:
        The network, with an int ``feature_dim``.

    Raises:
        UsageError: an unknown name, or ``image_size`` too small for the backbone.
        DataError: ``weights`` that do not fit it.

    Example::

        net = build_backbone("conv4", in_channels=1, image_size=28)
        print(net.feature_dim)  # 64
    """
    check_backbone(name, image_size)
    options = dict(in_channels=in_channels, num_classes=num_classes, weights=weights)
    if name in _REGISTRY:
        builder = _REGISTRY[name][0]
        if "image_size" in inspect.signature(builder).parameters:
            options["image_size"] = image_size
        return builder(**options)
    if name.endswith("-small"):
        return small_input_resnet(name[: -len("-small")], **options)
    return torchvision_backbone(name, **options)
