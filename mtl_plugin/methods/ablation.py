"""The ablation rows of ``mtl bench --suite ablation``: what to adapt after pretraining.

Sun et al. (CVPR 2019, Section 5.2) ask which parameters the meta-learner should
update once the backbone is pretrained. Every row here is meta-trained exactly as
``mtl`` (same tasks, budget, inner loop on the head only, meta-learned head
initialisation θ); only what the outer loop updates changes:

* ``ft-head`` FT [θ]: the pretrained backbone frozen, θ alone meta-learned;
* ``ft-last`` FT [Θ4; θ]: the last block's own weights and θ, MAML's operation;
* ``ft-all`` FT [Θ; θ]: every pretrained weight and θ;
* ``ss-last`` SS [Θ4; θ]: Scaling and Shifting on the last block only;
* ``mtl-ht-reuse``: the hard-task meta-batch reusing the failed tasks' samples;
* ``mtl-channel``: SS with one scale per output channel;
* ``mtl-bn-train``: SS with BatchNorm on batch statistics.

SS [Θ; θ] (``mtl``), its HT row (``mtl-ht``, resample) and train from scratch
(``scratch``) are the comparison suite's rows, reused as they are. "Last block"
is :func:`~mtl_plugin.ss.last_block` of the backbone (``layers.3`` of ResNet-12,
``layers.12`` of Conv4) unless ``MTLConfig.ss.layers`` names other modules.

Example::

    method = FinetuneLastBlock(MTLConfig.quick())
    method.fit(context)
    print(method.learned_parameters(context))
"""
from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl_plugin.meta_transfer import MetaTrainConfig
from mtl_plugin.methods.base import BenchContext
from mtl_plugin.methods.mtl import MTL, MTLHardTasks
from mtl_plugin.ss import SSConfig, last_block

__all__ = [
    "ABLATION_SUITE",
    "FinetuneAll",
    "FinetuneHead",
    "FinetuneLastBlock",
    "FinetunedLayers",
    "MTLChannel",
    "MTLHardTasksReuse",
    "MTLTrainBN",
    "SSLastBlock",
]

# The rows of ``mtl bench --suite ablation``, in the paper's order (Table 3).
ABLATION_SUITE = ("scratch", "ft-head", "ft-last", "ft-all", "ss-last", "mtl", "mtl-ht", "mtl-ht-reuse",
                  "mtl-channel", "mtl-bn-train")


class FinetunedLayers(nn.Module):
    """A pretrained backbone whose chosen modules keep their own weights trainable.

    The FT counterpart of :class:`~mtl_plugin.ss.SSAdapter`: the outer loop
    updates the weights themselves instead of Φ. BatchNorm stays in eval mode (its
    pretraining statistics), as with ``SSAdapter(bn="frozen")``, so that FT and SS
    rows differ by what they learn alone.

    Args:
        backbone: the pretrained backbone; modified in place (``requires_grad``).
        layers: module names as ``backbone.named_modules()`` spells them whose
            parameters learn; ``None``: every parameter; ``()``: none (FT [θ]).

    Raises:
        ValueError: if a name is not a module of ``backbone``.

    Example::

        encoder = FinetunedLayers(backbone, layers=[last_block(backbone)])   # FT [Θ4; θ]
        features = encoder(images)
    """

    def __init__(self, backbone: nn.Module, layers: Optional[tuple[str, ...]] = None):
        super().__init__()
        backbone.requires_grad_(layers is None)
        for name in layers or ():
            try:
                backbone.get_submodule(name).requires_grad_(True)
            except AttributeError:
                modules = ", ".join(n for n, _ in backbone.named_children())
                raise ValueError(
                    f"layers: {type(backbone).__name__} has no module {name!r}; name modules as "
                    f"named_modules() does (top level: {modules})"
                ) from None
        self.backbone = backbone
        self.layers = layers
        self.train(self.training)

    def train(self, mode: bool = True) -> "FinetunedLayers":
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class FinetuneHead(MTL):
    """FT [θ]: θ meta-learned on the frozen pretrained backbone (the slides' "finetune on pre-train model").

    Example::

        method = FinetuneHead(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "ft-head"
    adapts: ClassVar[str] = "FT [θ]"
    ablation_only: ClassVar[bool] = True

    def finetuned_layers(self, backbone: nn.Module) -> Optional[tuple[str, ...]]:
        """The modules whose weights the outer loop updates (``None``: all)."""
        return ()

    def encoder(self, context: BenchContext) -> nn.Module:
        backbone = context.pretrained_backbone()
        return FinetunedLayers(backbone, self.finetuned_layers(backbone))

    def meta_config(self, context: BenchContext) -> MetaTrainConfig:
        config = super().meta_config(context)
        lr = self.config.finetune_encoder_lr
        return config if lr is None else replace(config, encoder_lr=lr)


class FinetuneLastBlock(FinetuneHead):
    """FT [Θ4; θ]: the last block's weights and θ meta-learned from their pretrained values.

    Example::

        method = FinetuneLastBlock(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "ft-last"
    adapts: ClassVar[str] = "FT [Θ4; θ]"

    def finetuned_layers(self, backbone: nn.Module) -> Optional[tuple[str, ...]]:
        return self.config.ss.layers or (last_block(backbone),)


class FinetuneAll(FinetuneHead):
    """FT [Θ; θ]: every pretrained weight and θ meta-learned (MAML's operation on a deep backbone).

    Example::

        method = FinetuneAll(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "ft-all"
    adapts: ClassVar[str] = "FT [Θ; θ]"

    def finetuned_layers(self, backbone: nn.Module) -> Optional[tuple[str, ...]]:
        return None


class SSLastBlock(MTL):
    """SS [Θ4; θ]: Scaling and Shifting on the last block only, the other convs frozen as they are.

    Example::

        method = SSLastBlock(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "ss-last"
    adapts: ClassVar[str] = "SS [Θ4; θ]"
    ablation_only: ClassVar[bool] = True

    def ss_config(self, backbone: nn.Module) -> SSConfig:
        return replace(super().ss_config(backbone), layers=self.config.ss.layers or (last_block(backbone),))


class MTLHardTasksReuse(MTLHardTasks):
    """SS [Θ; θ] with the hard-task meta-batch in ``reuse`` mode (the failed tasks' own samples).

    Example::

        method = MTLHardTasksReuse(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "mtl-ht-reuse"
    adapts: ClassVar[str] = "SS [Θ; θ] + HT (reuse)"
    ablation_only: ClassVar[bool] = True

    def meta_config(self, context: BenchContext) -> MetaTrainConfig:
        return replace(super().meta_config(context), hard_task_mode="reuse")


class MTLChannel(MTL):
    """SS [Θ; θ] at ``channel`` granularity: one scale per output channel instead of per kernel.

    Example::

        method = MTLChannel(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "mtl-channel"
    adapts: ClassVar[str] = "SS [Θ; θ], channel"
    ablation_only: ClassVar[bool] = True

    def ss_config(self, backbone: nn.Module) -> SSConfig:
        return replace(super().ss_config(backbone), granularity="channel")


class MTLTrainBN(MTL):
    """SS [Θ; θ] with ``bn="train"``: BatchNorm on batch statistics while meta-training.

    Example::

        method = MTLTrainBN(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "mtl-bn-train"
    adapts: ClassVar[str] = "SS [Θ; θ], bn=train"
    ablation_only: ClassVar[bool] = True

    def ss_config(self, backbone: nn.Module) -> SSConfig:
        return replace(super().ss_config(backbone), bn="train")
