"""Benchmark methods, one file each, behind :class:`~mtl_plugin.bench.methods.base.FewShotMethod`,
registered as the rows of ``mtl bench`` (:mod:`mtl_plugin.bench.methods.registry`).

Example::

    from mtl_plugin.bench.methods import build_method
    method = build_method("protonet", profile="quick")
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

from mtl_plugin.bench.methods.base import BenchContext, FewShotMethod, fit_count, fit_settings
from mtl_plugin.bench.methods.cosine_finetune import CosineFinetune, CosineFinetuneConfig
from mtl_plugin.bench.methods.finetune import Finetune, FinetuneConfig
from mtl_plugin.bench.methods.linear_probe import LinearProbe, LinearProbeConfig
from mtl_plugin.bench.methods.maml import MAML, MAMLConfig
from mtl_plugin.bench.methods.matchingnet import MatchingNet, MatchingNetConfig
from mtl_plugin.bench.methods.meta_lstm import MetaLSTM, MetaLSTMConfig
from mtl_plugin.bench.methods.metanet import MetaNet, MetaNetConfig
from mtl_plugin.bench.methods.mtl import MTL, MTLConfig, MTLHardTasks, Scratch
from mtl_plugin.bench.methods.protonet import ProtoNet, ProtoNetConfig, ProtoNetConv4, ProtoNetConv4Config
from mtl_plugin.bench.methods.registry import (
    METHODS,
    MethodSpec,
    build_method,
    list_methods,
    method_spec,
    register_method,
    register_preset,
)
from mtl_plugin.bench.methods.tadam import TADAM, TADAMConfig

__all__ = [
    "BenchContext",
    "FewShotMethod",
    "METHODS",
    "METHOD_NAMES",
    "MethodSpec",
    "build_method",
    "fit_count",
    "fit_settings",
    "list_methods",
    "method_spec",
    "register_method",
    "register_preset",
]

# The built-in rows, registered here rather than where each class is defined because
# registration order is the results table's row order (scratch first, mtl's rows last).
register_method("scratch", config=MTLConfig)(Scratch)
register_method("finetune", config=FinetuneConfig)(Finetune)
register_method("cosine-finetune", config=CosineFinetuneConfig)(CosineFinetune)
register_method("protonet", config=ProtoNetConfig)(ProtoNet)
register_method("linear-probe", config=LinearProbeConfig)(LinearProbe)
register_method("protonet-conv4", config=ProtoNetConv4Config)(ProtoNetConv4)
register_method("maml", config=MAMLConfig)(MAML)
register_method("metanet", config=MetaNetConfig)(MetaNet)
register_method("matchingnet", config=MatchingNetConfig)(MatchingNet)
register_method("meta-lstm", config=MetaLSTMConfig)(MetaLSTM)
register_method("tadam", config=TADAMConfig)(TADAM)
register_method("mtl", config=MTLConfig)(MTL)
register_method("mtl-ht", config=MTLConfig)(MTLHardTasks)

# The ablation-only rows, presets of mtl and mtl-ht: imported once those are registered.
from mtl_plugin.bench.methods import ablation  # noqa: E402, F401

# The names registered on import (the built-in rows); METHODS and list_methods() also see later ones.
METHOD_NAMES = tuple(METHODS)
