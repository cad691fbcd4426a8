"""Feature backbones for few-shot learning, one builder per architecture.

Every builder returns an ``nn.Module`` with an int attribute ``feature_dim``.
With ``num_classes=0`` (the default) it maps images ``(B, C, H, W)`` to flat
features ``(B, feature_dim)``; with ``num_classes > 0`` it ends in a linear
classifier, reachable as ``model.head``, for the pretraining phase.

Example::

    from mtl_plugin.backbones import build_backbone
    net = build_backbone("resnet12", in_channels=3)           # 640-d features
    small = build_backbone("resnet18-small", in_channels=1)  # for 28-32 px images
    features = net(torch.randn(2, 3, 84, 84))                # (2, 640)
"""
from __future__ import annotations

import os
from typing import Union

import torch
import torchvision
from torch import nn

from mtl_plugin.errors import DataError, UsageError

__all__ = [
    "ResNet12",
    "Conv4",
    "resnet12",
    "conv4",
    "small_input_resnet",
    "torchvision_backbone",
    "build_backbone",
    "check_backbone",
    "BACKBONES",
]

Weights = Union[str, os.PathLike, dict, None]


def _head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()


class _ResNet12Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.layers(x)).flatten(1))


class Conv4(nn.Module):
    """Four blocks of 3x3 conv (``hidden`` filters), batch norm, ReLU and 2x2 max-pooling
    (Vinyals et al.; Snell et al.; Finn et al.), flattened: 64-d at 28 px, 1600-d at 84 px."""

    def __init__(
        self, in_channels: int = 3, hidden: int = 64, image_size: int = 84, num_classes: int = 0
    ):
        super().__init__()
        layers, previous, side = [], in_channels, image_size
        for _ in range(4):
            layers += [
                nn.Conv2d(previous, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous, side = hidden, side // 2
        if side < 1:
            raise UsageError(f"image size {image_size} px is too small for conv4 (four 2x2 poolings): "
                             f"use --image-size {MIN_IMAGE_SIZE['conv4']} or more")
        self.layers = nn.Sequential(*layers)
        self.feature_dim = hidden * side * side
        self.head = _head(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x).flatten(1))


def resnet12(in_channels: int = 3, num_classes: int = 0) -> ResNet12:
    """ResNet-12 with widths 64-160-320-640 (640-d features).

    Example::

        net = resnet12()
        features = net(torch.randn(5, 3, 84, 84))  # (5, 640)
    """
    return ResNet12(in_channels=in_channels, num_classes=num_classes)


def conv4(
    in_channels: int = 3, hidden: int = 64, num_classes: int = 0, image_size: int = 84
) -> Conv4:
    """Conv4 with ``hidden`` filters per layer; ``feature_dim`` depends on ``image_size``.

    Example::

        net = conv4(in_channels=1, image_size=28)
        features = net(torch.randn(5, 1, 28, 28))  # (5, 64)
    """
    return Conv4(in_channels=in_channels, hidden=hidden, image_size=image_size, num_classes=num_classes)


def _load_weights(model: nn.Module, weights: Weights) -> None:
    if weights is None:
        return
    state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"weights do not fit {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}; pass a state dict saved from the same architecture"
        )


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
    in_channels: int = 3,
    num_classes: int = 0,
    small_input: bool = False,
    weights: Weights = None,
) -> nn.Module:
    """Any torchvision classification model as a feature backbone.

    ``weights`` is a state dict (or a path to one) for the full torchvision model;
    nothing is downloaded. ``small_input=True`` (ResNet family only) swaps the
    7x7 stride-2 stem and the max-pool for a 3x3 stride-1 conv, for 28-32 px images.

    Example::

        net = torchvision_backbone("resnet50", weights="resnet50_meta_train.pt")
        features = net(torch.randn(2, 3, 224, 224))  # (2, 2048)
    """
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as error:
        raise UsageError(
            f"unknown torchvision architecture {arch!r}; see torchvision.models.list_models()"
        ) from error
    _load_weights(model, weights)
    if small_input or in_channels != 3:
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
    model.feature_dim = _replace_classifier(model, num_classes)
    return model


def small_input_resnet(
    arch: str = "resnet18", in_channels: int = 3, num_classes: int = 0, weights: Weights = None
) -> nn.Module:
    """A torchvision ResNet with a 3x3 stride-1 stem and no max-pool, for 28-32 px images.

    Example::

        net = small_input_resnet("resnet18", in_channels=1)
        features = net(torch.randn(4, 1, 28, 28))  # (4, 512)
    """
    return torchvision_backbone(
        arch, in_channels=in_channels, num_classes=num_classes, small_input=True, weights=weights
    )


BACKBONES = ("resnet12", "conv4", "resnet18-small", "<any torchvision.models name>")
# Four 2x2 max-poolings with floor rounding: 16 px is the smallest side that leaves one pixel.
MIN_IMAGE_SIZE = {"resnet12": 16, "conv4": 16}


def check_backbone(name: str, image_size: int | None = None) -> None:
    """Check that ``name`` is a backbone :func:`build_backbone` knows and fits ``image_size`` px.

    Cheap (nothing is built), so command lines call it before loading data or training.

    Args:
        name: ``resnet12``, ``conv4``, ``<torchvision resnet>-small`` or a torchvision
            classification model name.
        image_size: the image side the backbone will see; ``None`` skips the size check.

    Raises:
        UsageError: an unknown name, or images too small for the backbone's poolings.

    Example::

        check_backbone("resnet12", image_size=84)
    """
    classifiers = torchvision.models.list_models(module=torchvision.models)
    base = name[: -len("-small")] if name.endswith("-small") else name
    if name not in MIN_IMAGE_SIZE and base not in classifiers:
        raise UsageError(
            f"unknown backbone {name!r}, neither resnet12 nor conv4 and an unknown torchvision architecture: "
            f"use resnet12, conv4, a torchvision ResNet with -small (e.g. resnet18-small) or a torchvision "
            f"classification model (e.g. resnet18)"
        )
    minimum = MIN_IMAGE_SIZE.get(name)
    if image_size is not None and minimum is not None and image_size < minimum:
        raise UsageError(
            f"image size {image_size} px is too small for {name} (four 2x2 poolings): "
            f"use --image-size {minimum} or more"
        )


def build_backbone(
    name: str,
    in_channels: int = 3,
    num_classes: int = 0,
    image_size: int = 84,
    weights: Weights = None,
) -> nn.Module:
    """Build a backbone by name: ``resnet12``, ``conv4``, ``<torchvision resnet>-small``
    (e.g. ``resnet18-small``) or any torchvision model name.

    Raises:
        UsageError: an unknown name, or ``image_size`` too small for ResNet-12 or Conv4.

    Example::

        net = build_backbone("conv4", in_channels=1, image_size=28)
        print(net.feature_dim)  # 64
    """
    check_backbone(name, image_size)
    if name == "resnet12":
        model = resnet12(in_channels=in_channels, num_classes=num_classes)
    elif name == "conv4":
        model = conv4(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    elif name.endswith("-small"):
        return small_input_resnet(
            name[: -len("-small")], in_channels=in_channels, num_classes=num_classes, weights=weights
        )
    else:
        return torchvision_backbone(name, in_channels=in_channels, num_classes=num_classes, weights=weights)
    _load_weights(model, weights)
    return model
