"""Scaling and Shifting (SS): the meta-transfer adapter of Sun et al. (CVPR 2019).

Every ``nn.Conv2d``, ``nn.Linear`` and ``nn.MultiheadAttention`` of a frozen backbone
(or of the layers chosen with ``layers``) computes ``(W ⊙ Φ1) X + (b + Φ2)``, with a
learnable scale Φ1 (initialised to 1) and shift Φ2 (initialised to 0):
:mod:`mtl_plugin.ss.layers` holds the per-layer rules. A CNN's classification head is
adapted like any linear layer; remove it (``model.fc = nn.Identity()``) when a new
head replaces it, as :func:`mtl_plugin.backbones.build_backbone` does.

Example::

    from mtl_plugin import SSAdapter
    from mtl_plugin.backbones import resnet12
    adapter = SSAdapter(resnet12())              # backbone weights are frozen in place
    optimiser = torch.optim.Adam(adapter.ss_parameters(), lr=1e-4)
    features = adapter(torch.randn(2, 3, 84, 84))
    adapter.save_pretrained("ss")                # ss_config.json + ss_weights.pt
    adapter = SSAdapter.from_pretrained("ss", resnet12())
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from mtl_plugin.ss.config import SSConfig, read_pretrained, write_pretrained
from mtl_plugin.ss.layers import (
    ADAPTED_TYPES,
    SHARE_BOUND,
    LayerSelection,
    SSShareWarning,
    adapted_tensors,
    fold_layer,
    layer_row,
    outputs,
    scale_shape,
    select_modules,
)

__all__ = ["SSAdapter"]


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _scale_output(scale: torch.Tensor, shift: torch.Tensor, conv: nn.Conv2d, inputs, output: torch.Tensor):
    # conv(x, W ⊙ s) + b + Φ2 = s ⊙ conv(x, W) + (1 - s) ⊙ b + Φ2 for one scale s per output channel.
    shape = (1, -1) + (1,) * (output.dim() - 2)
    bias = shift if conv.bias is None else shift + (1 - scale.flatten()) * conv.bias
    return output * scale.view(shape) + bias.view(shape)


class SSAdapter(nn.Module):
    """Wrap a backbone so that only per-layer Scaling and Shifting parameters learn.

    The arguments after ``backbone`` are the fields of :class:`~mtl_plugin.ss.SSConfig`:
    :meth:`from_config` takes them as one, :attr:`config` gives them back, and
    :meth:`save_pretrained` / :meth:`from_pretrained` store and rebuild the adapter with them.

    Args:
        backbone: any module with an ``nn.Conv2d``, ``nn.Linear`` or
            ``nn.MultiheadAttention`` (every torchvision classification model,
            :mod:`mtl_plugin.backbones`). Its parameters are set to
            ``requires_grad=False`` in place and never copied.
        granularity: of the convs' scales: ``"auto"`` (one per 2-D kernel on convs
            with a spatial kernel, k x k > 1, as the paper; one per output channel on
            1x1 convs, where a scale per kernel would be one per weight),
            ``"kernel"`` (the paper's on every conv, shape ``(out, in/groups, 1, 1)``)
            or ``"channel"`` (one per output channel, ``(out, 1, 1, 1)``). Linear and
            attention layers always get one per output neuron, shape ``(out, 1)``.
            On convs with only 3x3 kernels (Conv4) ``"auto"`` is ``"kernel"``.
        bn: ``"frozen"`` keeps every BatchNorm in eval mode whatever ``train()`` is
            called with; ``"train"`` lets them use batch statistics in training mode.
        layers: which layers get Φ (the others stay frozen as they are): ``None``
            (every conv, linear and attention layer: the paper's SS [Θ; θ]), module
            names as ``backbone.named_modules()`` spells them (``["layer4"]``, or
            ``[last_block(backbone)]`` for SS [Θ4; θ]) or a predicate
            ``(name, layer) -> bool``, asked of every such layer (``lambda name, layer:
            isinstance(layer, nn.Conv2d)`` keeps SS on the convs alone).
        output_scaling: with ``"channel"`` granularity, scale each conv's output
            instead of its weight (the same function): the backward then forms no
            weight-sized gradient, at the cost of an elementwise pass over the
            activations. ``benchmarks/throughput.py`` measures which is faster.

    Warns:
        SSShareWarning: once, when SS would learn more than a quarter of the
            backbone's parameters, naming the layers that learn the most and the
            option that shrinks them.

    Raises:
        ValueError: for an unknown granularity or bn mode, a backbone with no layer
            to adapt or already adapted, ``layers`` that select none, or
            ``output_scaling`` without ``"channel"`` granularity.

    Example::

        adapter = SSAdapter(torchvision.models.vit_b_16())   # patch conv, attention, MLPs
        print(adapter.parameter_report().tail(1))            # totals and share of the backbone
        adapter.save_pretrained("ss-vit")                    # its config and Φ, a few hundred KB
        plain = adapter.fold()                               # same outputs, no overhead
    """

    def __init__(
        self,
        backbone: nn.Module,
        granularity: str = "auto",
        bn: str = "frozen",
        layers: LayerSelection = None,
        *,
        output_scaling: bool = False,
    ):
        super().__init__()
        # SSConfig checks the options; a predicate is recorded below by the names of the layers it picks.
        config = SSConfig(granularity, bn, None if callable(layers) else layers, output_scaling)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, not {type(backbone).__name__}")
        if any(isinstance(module, SSAdapter) for module in backbone.modules()):
            raise ValueError(
                f"{type(backbone).__name__} is already wrapped in an SSAdapter; "
                "adapt the original backbone once (or call .fold() first)"
            )
        all_layers = [(name, m) for name, m in backbone.named_modules() if isinstance(m, ADAPTED_TYPES)]
        if not all_layers:
            raise ValueError(
                f"{type(backbone).__name__} has no nn.Conv2d, nn.Linear or nn.MultiheadAttention layer: "
                "SSAdapter scales and shifts their weights, so pass a backbone built from them"
            )
        chosen = select_modules(backbone, layers, ADAPTED_TYPES)
        self.granularity = granularity
        self.output_scaling = output_scaling
        self.bn = bn
        self.layers = "<predicate>" if callable(layers) else layers
        self._config_layers = tuple(name for name, _ in chosen) if callable(layers) else config.layers
        # Every adaptable layer, adapted or not, for the parameter report.
        self._all_layers = all_layers
        self._backbone_size = sum(p.numel() for p in backbone.parameters())
        # Remembered so that fold() can give back a model as trainable as the one it got.
        self._requires_grad = {name: p.requires_grad for name, p in backbone.named_parameters()}
        backbone.requires_grad_(False)
        self.backbone = backbone
        # Named conv_names since SS was on convs only; it lists every adapted layer.
        self.conv_names = [name for name, _ in chosen]
        # A plain list: the layers are registered once, inside the backbone.
        self._layers = [layer for _, layer in chosen]
        like = [next(layer.parameters()) for layer in self._layers]
        self.scales = nn.ParameterList(
            nn.Parameter(torch.ones(scale_shape(c, granularity), dtype=w.dtype, device=w.device))
            for c, w in zip(self._layers, like)
        )
        self.shifts = nn.ParameterList(
            nn.Parameter(torch.zeros(outputs(c), dtype=w.dtype, device=w.device)) for c, w in zip(self._layers, like)
        )
        self.train(self.training)
        self._warn_if_large()

    @classmethod
    def from_config(cls, backbone: nn.Module, config: SSConfig) -> SSAdapter:
        """``SSAdapter(backbone, ...)`` with the options of ``config``.

        Raises:
            ValueError: as :class:`SSAdapter` does.

        Example::

            adapter = SSAdapter.from_config(resnet12(), SSConfig.paper())   # a scale per kernel on every conv
        """
        return cls(backbone, config.granularity, config.bn, config.layers, output_scaling=config.output_scaling)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, backbone: nn.Module) -> SSAdapter:
        """Rebuild on ``backbone`` the adapter that :meth:`save_pretrained` wrote to ``directory``.

        Args:
            directory: the folder :meth:`save_pretrained` wrote.
            backbone: a backbone of the architecture the adapter was saved from, usually with
                the same pretrained weights (they are not in ``directory``); frozen in place.

        Returns:
            The adapter, with the saved config and Φ.

        Raises:
            MissingDataError: ``directory`` holds no saved adapter (also a ``FileNotFoundError``).
            DataError: its files are damaged or were not written by :meth:`save_pretrained`.
            ValueError: the saved Φ does not fit ``backbone`` (the message names the first layer).

        Example::

            adapter = SSAdapter.from_pretrained("ss-resnet12", load_pretrained("runs/pre/best.pt"))
        """
        config, tensors = read_pretrained(directory)
        adapter = cls.from_config(backbone, config)
        adapter.load_ss_state_dict(tensors)
        return adapter

    @property
    def config(self) -> SSConfig:
        """The options this adapter was built with; a ``layers`` predicate appears as the names it selected.

        A name selects every layer under it, so the names stand for the predicate exactly unless it
        kept an attention layer but not its ``out_proj``.

        Example::

            SSAdapter(conv4(), layers=["layers.12"]).config   # SSConfig(granularity='auto', ..., layers=('layers.12',))
        """
        return SSConfig(self.granularity, self.bn, self._config_layers, self.output_scaling)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write :attr:`config` and Φ to ``directory``: all that :meth:`from_pretrained` needs besides the backbone.

        ``directory`` (created if needed) gets ``ss_config.json`` and ``ss_weights.pt`` (the
        tensors of :meth:`ss_state_dict` only), each replaced atomically.

        Returns:
            ``directory`` as a ``Path``.

        Raises:
            OutputError: a file could not be written.

        Example::

            adapter.save_pretrained("ss-resnet12")
            again = SSAdapter.from_pretrained("ss-resnet12", load_pretrained("runs/pre/best.pt"))
        """
        return write_pretrained(directory, self.config, self.ss_state_dict())

    def _warn_if_large(self) -> None:
        report = self.parameter_report()
        share = report["share"].iloc[-1]
        if share <= SHARE_BOUND:
            return
        body = report.iloc[:-1]
        large = body[body["ratio"] > SHARE_BOUND]
        large = (large if len(large) else body).sort_values("ss", ascending=False)
        names = ", ".join(large["layer"].head(5)) + (f" and {len(large) - 5} more" if len(large) > 5 else "")
        if (large["scale_per"] == "kernel").any():
            pointwise = (large["kernel"] == "1x1") & (large["scale_per"] == "kernel")
            option = (
                "granularity='auto' (one scale per channel on 1x1 convs)"
                if pointwise.any()
                else "granularity='channel' (one scale per output channel)"
            )
        else:
            option = "layers=... (adapt fewer layers)"
        warnings.warn(
            f"SSAdapter learns {share:.0%} of {type(self.backbone).__name__}'s {self._backbone_size:,} parameters, "
            f"more than {SHARE_BOUND:.0%}: most on {names}; {option} shrinks them",
            SSShareWarning,
            stacklevel=3,
        )

    def _scales_output(self, conv: nn.Module) -> bool:
        return self.output_scaling and isinstance(conv, nn.Conv2d)

    def _ss_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer, scale, shift in zip(self.conv_names, self._layers, self.scales, self.shifts):
            if not self._scales_output(layer):
                tensors.update((_key(name, key), value) for key, value in adapted_tensors(layer, scale, shift).items())
        return tensors

    def forward(self, *args, **kwargs):
        # functional_call swaps the scaled weights in for this call only: the backbone's own
        # tensors stay untouched, so nothing frozen is copied and autograd reaches Φ. Output
        # scaling hooks the convs for this call only, for the same reason.
        hooks = [
            conv.register_forward_hook(partial(_scale_output, scale, shift))
            for conv, scale, shift in zip(self._layers, self.scales, self.shifts)
            if self._scales_output(conv)
        ]
        try:
            return functional_call(self.backbone, self._ss_tensors(), args, kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def train(self, mode: bool = True) -> SSAdapter:
        super().train(mode)
        if self.bn == "frozen":
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def named_ss_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(f"{layer}.scale", Φ1)`` and ``(f"{layer}.shift", Φ2)`` for every adapted layer, in order."""
        for name, scale, shift in zip(self.conv_names, self.scales, self.shifts):
            yield _key(name, "scale"), scale
            yield _key(name, "shift"), shift

    def ss_parameters(self) -> Iterator[nn.Parameter]:
        """Only the Scaling and Shifting parameters: what the outer optimiser updates."""
        for _, parameter in self.named_ss_parameters():
            yield parameter

    def ss_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """The SS parameters alone, keyed by layer name (a resnet18's: 1.2 M values, 4.9 MB in float32)."""
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
            layer = key.rpartition(".")[0] or "<root layer>"
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
        """One row per conv, linear and attention layer: what SS learns there, then a total row.

        ``ratio`` counts the SS parameters against the affine map they modulate: the
        weights plus one bias per output (zero where the layer has none), as the paper
        counts a neuron. For a 3x3 conv with a scale per kernel it is (1+C)/(1+9C).
        ``share`` counts them against every parameter of the backbone (BatchNorm,
        embeddings and all), so the layers' shares add up to the total's. With
        ``layers``, the layers left out have ``adapted`` False and 0 SS parameters.

        Returns:
            Columns ``layer, kernel, in_per_group, out, scale_per, adapted, frozen, ss,
            ratio, share``; ``kernel`` is ``"3x3"``-like for a conv, ``"linear"`` or
            ``"attention"`` (the in-projection; ``out_proj`` is a row of its own);
            ``scale_per`` is ``"kernel"``, ``"channel"`` or ``"neuron"``.

        Example::

            SSAdapter(resnet12(), layers=["layers.3"]).parameter_report().tail(1)
        """
        ss = {
            name: scale.numel() + shift.numel() for name, scale, shift in zip(self.conv_names, self.scales, self.shifts)
        }
        rows = [
            {
                "layer": name or "<root>",
                **layer_row(layer, self.granularity),
                "adapted": name in ss,
                "ss": ss.get(name, 0),
            }
            for name, layer in self._all_layers
        ]
        frame = pd.DataFrame(rows)
        total = {
            "layer": "total",
            "kernel": "",
            "in_per_group": pd.NA,
            "out": int(frame["out"].sum()),
            "scale_per": "",
            "adapted": bool(frame["adapted"].all()),
            "frozen": int(frame["frozen"].sum()),
            "ss": int(frame["ss"].sum()),
            "_neuron": int(frame["_neuron"].sum()),
        }
        frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
        frame["ratio"] = frame["ss"] / frame["_neuron"]
        frame["share"] = frame["ss"] / self._backbone_size
        columns = ["layer", "kernel", "in_per_group", "out", "scale_per", "adapted", "frozen", "ss", "ratio", "share"]
        return frame[columns]

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain copy of the backbone (same class) with Φ merged into its layers' weights and
        biases: the same outputs, and no inference overhead.

        Example::

            torch.save(adapter.fold().state_dict(), "folded.pt")   # loads into the backbone's class
        """
        folded = copy.deepcopy(self.backbone)
        for name, scale, shift in zip(self.conv_names, self.scales, self.shifts):
            fold_layer(folded.get_submodule(name), scale, shift)
        for name, parameter in folded.named_parameters():
            weight_name = name[: -len("bias")] + "weight" if name.endswith("bias") else name
            parameter.requires_grad_(self._requires_grad.get(name, self._requires_grad.get(weight_name, True)))
        folded.train(self.training)
        return folded

    def extra_repr(self) -> str:
        layers = "" if self.layers is None else f", layers={self.layers!r}"
        scaling = ", output_scaling=True" if self.output_scaling else ""
        return (
            f"granularity={self.granularity!r}{scaling}, bn={self.bn!r}{layers}, "
            f"layers adapted={len(self.conv_names)} of {len(self._all_layers)}"
        )
