"""The ablation rows of ``mtl bench --suite ablation``: what to adapt after pretraining.

Sun et al. (CVPR 2019, Section 5.2) ask which parameters the meta-learner should
update once the backbone is pretrained. Every row here is a named config preset of
``mtl`` (or ``mtl-ht``), registered with :func:`~mtl_plugin.bench.methods.registry.register_preset`:
it is meta-trained exactly as ``mtl`` (same tasks, budget, inner loop on the head only,
meta-learned head initialisation θ); only what the outer loop updates changes:

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

    method = build_method("ft-last", profile="quick")   # MTL(ft_last_block(MTLConfig.quick()))
    method.fit(context)
    print(method.learned_parameters(context))
"""

from __future__ import annotations

from dataclasses import replace

from mtl_plugin.bench.methods.mtl import FinetunedLayers, MTLConfig
from mtl_plugin.bench.methods.registry import register_preset

__all__ = [
    "ABLATION_SUITE",
    "FinetunedLayers",
    "finetune_all",
    "finetune_head",
    "finetune_last_block",
    "mtl_bn_train",
    "mtl_channel",
    "mtl_hard_tasks_reuse",
    "ss_last_block",
]

# The rows of ``mtl bench --suite ablation``, in the paper's order (Table 3).
ABLATION_SUITE = (
    "scratch",
    "ft-head",
    "ft-last",
    "ft-all",
    "ss-last",
    "mtl",
    "mtl-ht",
    "mtl-ht-reuse",
    "mtl-channel",
    "mtl-bn-train",
)


# Registration order is row order in METHODS (the comparison table's, for the rows in it).
@register_preset("ft-head", base="mtl", adapts="FT [θ]", ablation_only=True)
def finetune_head(config: MTLConfig) -> MTLConfig:
    """FT [θ]: θ meta-learned on the frozen pretrained backbone (the slides' "finetune on pre-train model")."""
    return replace(config, adapt="finetune", blocks="none")


@register_preset("ft-last", base="mtl", adapts="FT [Θ4; θ]", ablation_only=True)
def finetune_last_block(config: MTLConfig) -> MTLConfig:
    """FT [Θ4; θ]: the last block's weights and θ meta-learned from their pretrained values."""
    return replace(config, adapt="finetune", blocks="last")


@register_preset("ft-all", base="mtl", adapts="FT [Θ; θ]", ablation_only=True)
def finetune_all(config: MTLConfig) -> MTLConfig:
    """FT [Θ; θ]: every pretrained weight and θ meta-learned (MAML's operation on a deep backbone)."""
    return replace(config, adapt="finetune", blocks="all")


@register_preset("ss-last", base="mtl", adapts="SS [Θ4; θ]", ablation_only=True)
def ss_last_block(config: MTLConfig) -> MTLConfig:
    """SS [Θ4; θ]: Scaling and Shifting on the last block only, the other convs frozen as they are."""
    return replace(config, adapt="ss", blocks="last")


@register_preset("mtl-ht-reuse", base="mtl-ht", adapts="SS [Θ; θ] + HT (reuse)", ablation_only=True)
def mtl_hard_tasks_reuse(config: MTLConfig) -> MTLConfig:
    """SS [Θ; θ] with the hard-task meta-batch in ``reuse`` mode (the failed tasks' own samples)."""
    return replace(config, meta=replace(config.meta, hard_task_mode="reuse"))


@register_preset("mtl-channel", base="mtl", adapts="SS [Θ; θ], channel", ablation_only=True)
def mtl_channel(config: MTLConfig) -> MTLConfig:
    """SS [Θ; θ] at ``channel`` granularity: one scale per output channel instead of per kernel."""
    return replace(config, ss=replace(config.ss, granularity="channel"))


@register_preset("mtl-bn-train", base="mtl", adapts="SS [Θ; θ], bn=train", ablation_only=True)
def mtl_bn_train(config: MTLConfig) -> MTLConfig:
    """SS [Θ; θ] with ``bn="train"``: BatchNorm on batch statistics while meta-training."""
    return replace(config, ss=replace(config.ss, bn="train"))
