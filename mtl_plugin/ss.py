"""Scaling and Shifting (SS): the meta-transfer adapter of Sun et al. (CVPR 2019).

Every ``nn.Conv2d`` of a frozen backbone (or of the layers chosen with ``layers``)
computes ``(W ⊙ Φ1) X + (b + Φ2)``, with a learnable scale Φ1 (initialised to 1)
and shift Φ2 (initialised to 0). A fully-connected model (no conv) gets SS on its
``nn.Linear`` layers instead: one scale and one shift per neuron.

Example::

    from mtl_plugin import SSAdapter
    from mtl_plugin.backbones import resnet12
    adapter = SSAdapter(resnet12())              # backbone weights are frozen in place
    optimiser = torch.optim.Adam(adapter.ss_parameters(), lr=1e-4)
    features = adapter(torch.randn(2, 3, 84, 84))
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SSAdapter", "GRANULARITIES", "BN_MODES", "LayerSelection", "last_block", "select_modules"]

GRANULARITIES = ("kernel", "channel")
BN_MODES = ("frozen", "train")

# Module names as ``named_modules()`` spells them (a name selects everything under it),
# or a predicate on (name, module); None selects everything.
LayerSelection = Optional[Union[str, Sequence[str], Callable[[str, nn.Module], bool]]]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _container_names(model: nn.Module, kind: type) -> list[str]:
    """Names a user may give: modules holding a ``kind`` layer, at most two levels deep."""
    names = []
    for name, module in model.named_modules():
        if name and name.count(".") < 2 and any(isinstance(m, kind) for m in module.modules()):
            names.append(name)
    return names


def select_modules(model: nn.Module, layers: LayerSelection, kind: type = nn.Conv2d) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of type ``kind`` in ``model`` that ``layers`` selects, in order.

    Args:
        model: the backbone.
        layers: ``None`` (every ``kind`` module), a module name or names as
            ``model.named_modules()`` spells them (``"layer4"`` selects every conv
            under ``layer4``), or a predicate ``(name, module) -> bool`` asked of
            each ``kind`` module.
        kind: the module type to select.

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
                    f"layers: {type(model).__name__} has no {kind.__name__} named {prefix!r} or under it; "
                    f"name modules as named_modules() does, e.g. {valid}"
                )
        chosen = [(name, m) for name, m in found if any(_under(name, p) for p in names)]
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no {kind.__name__} of {type(model).__name__}")
    return chosen


def last_block(model: nn.Module) -> str:
    """The name of the block that holds ``model``'s last conv: the paper's Θ4 of ResNet-12.

    The block is the outermost element of an ``nn.Sequential`` on the path to the
    last conv: ``"layers.3"`` for this package's ResNet-12, ``"layers.12"`` (the
    last conv) for Conv4, ``"layer4.1"`` for a torchvision ResNet; without any
    ``nn.Sequential`` on the path, the last conv itself.

    Raises:
        ValueError: if ``model`` has no ``nn.Conv2d``.

    Example::

        adapter = SSAdapter(resnet12(), layers=[last_block(backbone)])   # SS [Θ4; θ]
    """
    name = select_modules(model, None)[-1][0]
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        parent = model.get_submodule(".".join(parts[: depth - 1]))
        if isinstance(parent, nn.Sequential):
            return ".".join(parts[:depth])
    return name


def _scale_shape(layer: nn.Module, granularity: str) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        # A linear weight entry is a single number: the smallest unit worth a scale is the neuron.
        return (layer.out_features, 1)
    if granularity == "kernel":
        return (layer.out_channels, layer.in_channels // layer.groups, 1, 1)
    return (layer.out_channels, 1, 1, 1)


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _scale_output(scale: torch.Tensor, shift: torch.Tensor, conv: nn.Conv2d, inputs, output: torch.Tensor):
    # conv(x, W ⊙ s) + b + Φ2 = s ⊙ conv(x, W) + (1 - s) ⊙ b + Φ2 for one scale s per output channel.
    shape = (1, -1) + (1,) * (output.dim() - 2)
    bias = shift if conv.bias is None else shift + (1 - scale.flatten()) * conv.bias
    return output * scale.view(shape) + bias.view(shape)


class SSAdapter(nn.Module):
    """Wrap a backbone so that only per-conv Scaling and Shifting parameters learn.

    Args:
        backbone: any module with an ``nn.Conv2d`` (torchvision models,
            :mod:`mtl_plugin.backbones`), or a fully-connected one with an
            ``nn.Linear`` (SS then goes on its linear layers, one scale and shift per
            neuron). Its parameters are set to ``requires_grad=False`` in place and
            never copied.
        granularity: ``"kernel"`` (the paper: one scale per 2-D kernel, shape
            ``(out, in/groups, 1, 1)``) or ``"channel"`` (one per output channel);
            linear layers always get one per neuron, shape ``(out, 1)``.
        bn: ``"frozen"`` keeps every BatchNorm in eval mode whatever ``train()`` is
            called with; ``"train"`` lets them use batch statistics in training mode.
        layers: which convs get Φ (the others stay frozen as they are): ``None``
            (every conv, the paper's SS [Θ; θ]), module names as
            ``backbone.named_modules()`` spells them (``["layer4"]``, or
            ``[last_block(backbone)]`` for SS [Θ4; θ]) or a predicate
            ``(name, conv) -> bool``.
        output_scaling: with ``"channel"`` granularity, scale each conv's output
            instead of its weight (the same function): the backward then forms no
            weight-sized gradient, at the cost of an elementwise pass over the
            activations. ``benchmarks/throughput.py`` measures which is faster.

    Raises:
        ValueError: for an unknown granularity or bn mode, a backbone with neither
            convs nor linear layers or already adapted, ``layers`` that select none,
            or ``output_scaling`` with ``"kernel"`` granularity.

    Example::

        adapter = SSAdapter(torchvision.models.resnet18(), granularity="kernel")
        print(adapter.parameter_report().tail(1))   # totals
        torch.save(adapter.ss_state_dict(), "ss.pt")  # a few MB
        plain = adapter.fold()                        # same outputs, no overhead
    """

    def __init__(self, backbone: nn.Module, granularity: str = "kernel", bn: str = "frozen",
                 layers: LayerSelection = None, *, output_scaling: bool = False):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if output_scaling and granularity != "channel":
            raise ValueError("output_scaling=True needs granularity='channel': a scale per kernel mixes input "
                             "channels, so it cannot move to the conv's output")
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; valid: {', '.join(BN_MODES)}")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, not {type(backbone).__name__}")
        if any(isinstance(module, SSAdapter) for module in backbone.modules()):
            raise ValueError(
                f"{type(backbone).__name__} is already wrapped in an SSAdapter; "
                "adapt the original backbone once (or call .fold() first)"
            )
        # The paper's SS is on convolutions; a model without any gets it on its linear layers.
        kind = nn.Conv2d if any(isinstance(m, nn.Conv2d) for m in backbone.modules()) else nn.Linear
        all_convs = [(name, m) for name, m in backbone.named_modules() if isinstance(m, kind)]
        if not all_convs:
            raise ValueError(
                f"{type(backbone).__name__} has no nn.Conv2d or nn.Linear layer: SSAdapter scales and "
                "shifts their weights, so pass a convolutional or fully-connected backbone"
            )
        convs = select_modules(backbone, layers, kind)
        self.granularity = granularity
        self.output_scaling = output_scaling
        self.bn = bn
        self.layers = "<predicate>" if callable(layers) else layers
        # Every conv, adapted or not, for the parameter report.
        self._all_convs = all_convs
        # Remembered so that fold() can give back a model as trainable as the one it got.
        self._requires_grad = {name: p.requires_grad for name, p in backbone.named_parameters()}
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.conv_names = [name for name, _ in convs]
        # A plain list: the convs are registered once, inside the backbone.
        self._convs = [conv for _, conv in convs]
        self.scales = nn.ParameterList(
            nn.Parameter(torch.ones(_scale_shape(c, granularity), dtype=c.weight.dtype, device=c.weight.device))
            for c in self._convs
        )
        self.shifts = nn.ParameterList(
            nn.Parameter(torch.zeros(_outputs(c), dtype=c.weight.dtype, device=c.weight.device))
            for c in self._convs
        )
        self.train(self.training)

    def _scales_output(self, conv: nn.Module) -> bool:
        return self.output_scaling and isinstance(conv, nn.Conv2d)

    def _ss_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, conv, scale, shift in zip(self.conv_names, self._convs, self.scales, self.shifts):
            if not self._scales_output(conv):
                tensors[_key(name, "weight")] = conv.weight * scale
                tensors[_key(name, "bias")] = shift if conv.bias is None else conv.bias + shift
        return tensors

    def forward(self, *args, **kwargs):
        # functional_call swaps the scaled weights in for this call only: the backbone's own
        # tensors stay untouched, so nothing frozen is copied and autograd reaches Φ. Output
        # scaling hooks the convs for this call only, for the same reason.
        hooks = [conv.register_forward_hook(partial(_scale_output, scale, shift))
                 for conv, scale, shift in zip(self._convs, self.scales, self.shifts) if self._scales_output(conv)]
        try:
            return functional_call(self.backbone, self._ss_tensors(), args, kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def train(self, mode: bool = True) -> "SSAdapter":
        super().train(mode)
        if self.bn == "frozen":
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def named_ss_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(f"{conv}.scale", Φ1)`` and ``(f"{conv}.shift", Φ2)`` for every conv, in order."""
        for name, scale, shift in zip(self.conv_names, self.scales, self.shifts):
            yield _key(name, "scale"), scale
            yield _key(name, "shift"), shift

    def ss_parameters(self) -> Iterator[nn.Parameter]:
        """Only the Scaling and Shifting parameters: what the outer optimiser updates."""
        for _, parameter in self.named_ss_parameters():
            yield parameter

    def ss_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The SS parameters alone, keyed by conv name (a resnet18's is a few MB)."""
        return OrderedDict((name, p.detach().clone()) for name, p in self.named_ss_parameters())

    def load_ss_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`ss_state_dict` saved.

        Args:
            state: SS tensors by name, as :meth:`ss_state_dict` returns them.

        Raises:
            ValueError: naming the first layer that does not fit (another architecture or granularity).

        Example::

            adapter.load_ss_state_dict(torch.load("ss.pt", weights_only=True))
        """
        expected = OrderedDict(self.named_ss_parameters())
        for key, parameter in expected.items():
            layer = key.rpartition(".")[0] or "<root conv>"
            if key not in state:
                raise ValueError(
                    f"SS state does not fit this backbone: layer {layer!r} has no {key!r} in the "
                    "state; was it saved from another architecture?"
                )
            if tuple(state[key].shape) != tuple(parameter.shape):
                raise ValueError(
                    f"SS state does not fit this backbone: layer {layer!r} expects {key} of shape "
                    f"{tuple(parameter.shape)}, the state has {tuple(state[key].shape)} "
                    "(another architecture or granularity)"
                )
        extra = [key for key in state if key not in expected]
        if extra:
            raise ValueError(
                f"SS state does not fit this backbone: it has {extra[0]!r}, which this backbone "
                "lacks; was it saved from another architecture?"
            )
        with torch.no_grad():
            for key, parameter in expected.items():
                parameter.copy_(state[key])

    def parameter_report(self) -> pd.DataFrame:
        """One row per conv: frozen and SS parameter counts and their ratio, then a total row.

        ``ratio`` counts the SS parameters against the affine map they modulate: the
        weights plus one bias per output (zero where the conv has none), as the paper
        counts a neuron. For a 3x3 conv at kernel granularity it is (1+C)/(1+9C).
        With ``layers``, the convs left out have ``adapted`` False and 0 SS
        parameters, so the total's ratio is over every conv of the backbone.

        Returns:
            Columns ``layer, kernel, in_per_group, out, adapted, frozen, ss, ratio``.

        Example::

            SSAdapter(resnet12(), layers=["layers.3"]).parameter_report().tail(1)
        """
        ss = {name: scale.numel() + shift.numel()
              for name, scale, shift in zip(self.conv_names, self.scales, self.shifts)}
        rows = []
        for name, conv in self._all_convs:
            frozen = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
            linear = isinstance(conv, nn.Linear)
            rows.append(
                {
                    "layer": name or "<root>",
                    "kernel": "linear" if linear else "x".join(map(str, conv.kernel_size)),
                    "in_per_group": conv.in_features if linear else conv.in_channels // conv.groups,
                    "out": _outputs(conv),
                    "adapted": name in ss,
                    "frozen": frozen,
                    "ss": ss.get(name, 0),
                    "_neuron": conv.weight.numel() + _outputs(conv),
                }
            )
        frame = pd.DataFrame(rows)
        total = {
            "layer": "total",
            "kernel": "",
            "in_per_group": pd.NA,
            "out": int(frame["out"].sum()),
            "adapted": bool(frame["adapted"].all()),
            "frozen": int(frame["frozen"].sum()),
            "ss": int(frame["ss"].sum()),
            "_neuron": int(frame["_neuron"].sum()),
        }
        frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
        frame["ratio"] = frame["ss"] / frame["_neuron"]
        return frame.drop(columns="_neuron")

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain copy of the backbone (same class) with Φ merged into its conv weights and
        biases: the same outputs, and no inference overhead."""
        folded = copy.deepcopy(self.backbone)
        for name, scale, shift in zip(self.conv_names, self.scales, self.shifts):
            conv = folded.get_submodule(name)
            conv.weight.mul_(scale)
            if conv.bias is None:
                conv.bias = nn.Parameter(shift.detach().clone())
            else:
                conv.bias.add_(shift)
        for name, parameter in folded.named_parameters():
            weight_name = name[: -len("bias")] + "weight" if name.endswith("bias") else name
            parameter.requires_grad_(self._requires_grad.get(name, self._requires_grad.get(weight_name, True)))
        folded.train(self.training)
        return folded

    def extra_repr(self) -> str:
        layers = "" if self.layers is None else f", layers={self.layers!r}"
        scaling = ", output_scaling=True" if self.output_scaling else ""
        return (f"granularity={self.granularity!r}{scaling}, bn={self.bn!r}{layers}, "
                f"convs={len(self.conv_names)} of {len(self._all_convs)}")
