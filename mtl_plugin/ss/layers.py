"""The per-layer rules of Scaling and Shifting: which layers SS adapts, Φ's shapes, the swap.

Three layer types hold the weights of torchvision's classification models, CNNs and
transformers alike, and each gets a scale Φ1 (initialised to 1) on its weight and a
shift Φ2 (initialised to 0) on its bias:

- ``nn.Conv2d``: one scale per 2-D kernel, shape ``(out, in/groups, 1, 1)`` (the
  paper's), or one per output channel, shape ``(out, 1, 1, 1)``.
- ``nn.Linear``: one scale per output neuron, shape ``(out, 1)``: the form that
  "Scaling & Shifting your Features" (Lian et al., NeurIPS 2022) uses on ViTs.
- ``nn.MultiheadAttention``: its packed query/key/value projection
  (``in_proj_weight``, or ``q/k/v_proj_weight`` when their widths differ, and
  ``in_proj_bias``), one scale per output neuron, shape ``(3 * embed_dim, 1)``. Its
  ``out_proj`` is an ``nn.Linear`` and adapted as one.

Granularity ``"auto"`` keeps the paper's scale per kernel where its count holds, on
convs with a spatial kernel (k x k > 1): there it learns about 1/(k x k) of the
layer. On a 1x1 conv a scale per kernel is one per weight, a full reparameterisation,
so ``"auto"`` gives those one scale per output channel.

Example::

    layer = nn.Conv2d(64, 256, 1)
    scale_shape(layer, "kernel"), scale_shape(layer, "auto")   # (256, 64, 1, 1), (256, 1, 1, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ADAPTED_TYPES",
    "GRANULARITIES",
    "SHARE_BOUND",
    "LayerSelection",
    "SSShareWarning",
    "adapted_tensors",
    "fold_layer",
    "last_block",
    "layer_row",
    "outputs",
    "scale_shape",
    "select_modules",
    "type_names",
]

ADAPTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
GRANULARITIES = ("auto", "kernel", "channel")
# Above this share of the backbone's parameters SS stops being the small adapter it is meant to be.
SHARE_BOUND = 0.25


class SSShareWarning(UserWarning):
    """SS would learn more than :data:`SHARE_BOUND` of the backbone's parameters."""


def type_names(kind: type | tuple[type, ...]) -> str:
    """``"Conv2d"``, or ``"Conv2d, Linear or MultiheadAttention"`` for a tuple of types."""
    names = [k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# Module names as ``named_modules()`` spells them (a name selects everything under it),
# or a predicate on (name, module); None selects everything.
LayerSelection = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _container_names(model: nn.Module, kind: type | tuple[type, ...]) -> list[str]:
    """Names a user may give: modules holding a ``kind`` layer, at most two levels deep."""
    names = []
    for name, module in model.named_modules():
        if name and name.count(".") < 2 and any(isinstance(m, kind) for m in module.modules()):
            names.append(name)
    return names


def select_modules(
    model: nn.Module, layers: LayerSelection, kind: type | tuple[type, ...] = nn.Conv2d
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of type ``kind`` in ``model`` that ``layers`` selects, in order.

    Args:
        model: the backbone.
        layers: ``None`` (every ``kind`` module), a module name or names as
            ``model.named_modules()`` spells them (``"layer4"`` selects every conv
            under ``layer4``), or a predicate ``(name, module) -> bool`` asked of
            each ``kind`` module.
        kind: the module type (or a tuple of types) to select.

    Returns:
        The selected modules with their qualified names.

    Raises:
        ValueError: if a name selects no ``kind`` module (the message lists the
            names that do) or nothing at all is selected.

    Example::

        convs = select_modules(torchvision.models.resnet18(), ["layer4"])   # 5 convs
        convs = select_modules(resnet12(), lambda name, conv: conv.kernel_size == (3, 3))
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    if layers is None:
        chosen = found
    elif callable(layers):
        chosen = [(name, m) for name, m in found if layers(name, m)]
    else:
        names = (layers,) if isinstance(layers, str) else tuple(layers)
        for prefix in names:
            if not any(_under(name, prefix) for name, _ in found):
                valid = ", ".join(_container_names(model, kind)[:16])
                raise ValueError(
                    f"layers: {type(model).__name__} has no {type_names(kind)} named {prefix!r} or under it; "
                    f"name modules as named_modules() does, e.g. {valid}"
                )
        chosen = [(name, m) for name, m in found if any(_under(name, p) for p in names)]
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no {type_names(kind)} of {type(model).__name__}")
    return chosen


def last_block(model: nn.Module) -> str:
    """The name of the block that holds ``model``'s last weight-carrying layer: the paper's Θ4 of ResNet-12.

    The layer is the last ``nn.Conv2d``, ``nn.Linear`` or ``nn.MultiheadAttention`` that lies
    inside an ``nn.Sequential`` (a classifier such as a torchvision ResNet's ``fc``, outside
    any, is passed over), and the block is the outermost element of an ``nn.Sequential`` on
    its path: ``"layers.3"`` for this package's ResNet-12, ``"layers.12"`` (the last conv) for
    Conv4, ``"layer4.1"`` for a torchvision ResNet, ``"encoder.layers.encoder_layer_3"`` for a
    4-layer torchvision ``VisionTransformer`` without its ``heads`` (which, kept, is an
    ``nn.Sequential`` and would be the last block). Without any ``nn.Sequential``, the last such
    layer itself.

    Raises:
        ValueError: if ``model`` has no ``nn.Conv2d``, ``nn.Linear`` or ``nn.MultiheadAttention``.

    Example::

        adapter = SSAdapter(resnet12(), layers=[last_block(backbone)])   # SS [Θ4; θ]
    """
    names = [name for name, _ in select_modules(model, None, ADAPTED_TYPES)]
    blocks = [block for block in (_outer_sequential_element(model, name) for name in names) if block]
    return blocks[-1] if blocks else names[-1]


def _outer_sequential_element(model: nn.Module, name: str) -> str | None:
    """The outermost element of an ``nn.Sequential`` on the path to module ``name``; ``None`` if none."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        if isinstance(model.get_submodule(".".join(parts[: depth - 1])), nn.Sequential):
            return ".".join(parts[:depth])
    return None


def _per_kernel(layer: nn.Module, granularity: str) -> bool:
    if not isinstance(layer, nn.Conv2d) or granularity == "channel":
        return False
    return granularity == "kernel" or math.prod(layer.kernel_size) > 1


def outputs(layer: nn.Module) -> int:
    """The number of output neurons (channels) that Φ2 shifts."""
    if isinstance(layer, nn.MultiheadAttention):
        return 3 * layer.embed_dim
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def scale_shape(layer: nn.Module, granularity: str) -> tuple[int, ...]:
    """The shape of Φ1 for ``layer`` at ``granularity`` (see the module's docstring)."""
    if isinstance(layer, nn.Conv2d):
        return (layer.out_channels, layer.in_channels // layer.groups if _per_kernel(layer, granularity) else 1, 1, 1)
    # A linear weight entry is a single number: the smallest unit worth a scale is the neuron.
    return (outputs(layer), 1)


def _weight_names(layer: nn.Module) -> list[str]:
    if isinstance(layer, nn.MultiheadAttention):
        return ["in_proj_weight"] if layer._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return ["weight"]


def _bias_name(layer: nn.Module) -> str:
    return "in_proj_bias" if isinstance(layer, nn.MultiheadAttention) else "bias"


def adapted_tensors(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """``layer``'s weights times Φ1 and its bias plus Φ2, by attribute name.

    Args:
        layer: a module of one of :data:`ADAPTED_TYPES`.
        scale: Φ1, of :func:`scale_shape`.
        shift: Φ2, of shape ``(outputs(layer),)``.

    Returns:
        ``{"weight": W * Φ1, "bias": b + Φ2}`` (a missing bias counts as zero); for
        attention the in-projection's names, Φ1's rows split over q, k and v.

    Example::

        adapted_tensors(nn.Linear(3, 2), torch.ones(2, 1), torch.zeros(2))["weight"].shape   # (2, 3)
    """
    names = _weight_names(layer)
    tensors = {name: getattr(layer, name) * part for name, part in zip(names, scale.chunk(len(names)))}
    bias = getattr(layer, _bias_name(layer))
    tensors[_bias_name(layer)] = shift if bias is None else bias + shift
    return tensors


@torch.no_grad()
def fold_layer(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Write :func:`adapted_tensors` into ``layer`` in place, giving it a bias if it had none.

    Example::

        fold_layer(conv, scale, shift)   # conv(x) now equals the adapted conv's output
    """
    for name, tensor in adapted_tensors(layer, scale, shift).items():
        current = getattr(layer, name)
        if current is None:
            setattr(layer, name, nn.Parameter(tensor.detach().clone()))
        else:
            current.copy_(tensor)


def layer_row(layer: nn.Module, granularity: str) -> dict[str, object]:
    """The parameter report's description of ``layer``: kind, widths and the affine map's size.

    ``frozen`` counts the weights and bias that SS modulates (for attention the
    in-projection only: ``out_proj`` has its own row); ``_neuron`` adds one bias per
    output where the layer has none, as the paper counts a neuron.

    Example::

        layer_row(nn.Conv2d(4, 8, 3), "auto")["kernel"]   # "3x3"
    """
    weights = [getattr(layer, name) for name in _weight_names(layer)]
    bias = getattr(layer, _bias_name(layer))
    size = sum(w.numel() for w in weights)
    conv = isinstance(layer, nn.Conv2d)
    if conv:
        kernel, inputs = "x".join(map(str, layer.kernel_size)), layer.in_channels // layer.groups
    else:
        kernel, inputs = ("attention" if isinstance(layer, nn.MultiheadAttention) else "linear"), weights[0].shape[1]
    return {
        "kernel": kernel,
        "in_per_group": inputs,
        "out": outputs(layer),
        "scale_per": "kernel" if _per_kernel(layer, granularity) else "channel" if conv else "neuron",
        "frozen": size + (bias.numel() if bias is not None else 0),
        "_neuron": size + outputs(layer),
    }
