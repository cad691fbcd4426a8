"""Benchmark methods, one file each, behind :class:`~mtl_plugin.methods.base.FewShotMethod`.

Example::

    from mtl_plugin.methods import build_method
    method = build_method("protonet", profile="quick")
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""
from __future__ import annotations

from mtl_plugin.methods.base import BenchContext, FewShotMethod
from mtl_plugin.methods.cosine_finetune import CosineFinetune, CosineFinetuneConfig
from mtl_plugin.methods.finetune import Finetune, FinetuneConfig
from mtl_plugin.methods.linear_probe import LinearProbe, LinearProbeConfig, fit_logistic_regression
from mtl_plugin.methods.maml import MAML, MAMLConfig
from mtl_plugin.methods.metanet import MetaNet, MetaNetConfig
from mtl_plugin.methods.mtl import MTL, MTLConfig, MTLHardTasks, Scratch
from mtl_plugin.methods.protonet import ProtoNet, ProtoNetConfig, ProtoNetConv4, ProtoNetConv4Config
from mtl_plugin.methods.matchingnet import MatchingNet, MatchingNetConfig
from mtl_plugin.methods.meta_lstm import MetaLSTM, MetaLSTMConfig
from mtl_plugin.methods.tadam import TADAM, TADAMConfig
from mtl_plugin.methods.ablation import (
    FinetuneAll, FinetuneHead, FinetuneLastBlock, MTLChannel, MTLHardTasksReuse, MTLTrainBN, SSLastBlock,
)

__all__ = ["BenchContext", "FewShotMethod", "METHODS", "METHOD_NAMES", "build_method"]

# name -> (method class, config class); each config class has a ``quick()`` profile.
METHODS = {
    "scratch": (Scratch, MTLConfig),
    "finetune": (Finetune, FinetuneConfig),
    "cosine-finetune": (CosineFinetune, CosineFinetuneConfig),
    "protonet": (ProtoNet, ProtoNetConfig),
    "linear-probe": (LinearProbe, LinearProbeConfig),
    "protonet-conv4": (ProtoNetConv4, ProtoNetConv4Config),
    "maml": (MAML, MAMLConfig),
    "metanet": (MetaNet, MetaNetConfig),
    "matchingnet": (MatchingNet, MatchingNetConfig),
    "meta-lstm": (MetaLSTM, MetaLSTMConfig),
    "tadam": (TADAM, TADAMConfig),
    "mtl": (MTL, MTLConfig),
    "mtl-ht": (MTLHardTasks, MTLConfig),
    # Ablation-only rows (``ablation_only``): in ``--suite ablation``, never in the comparison suite.
    "ft-head": (FinetuneHead, MTLConfig),
    "ft-last": (FinetuneLastBlock, MTLConfig),
    "ft-all": (FinetuneAll, MTLConfig),
    "ss-last": (SSLastBlock, MTLConfig),
    "mtl-ht-reuse": (MTLHardTasksReuse, MTLConfig),
    "mtl-channel": (MTLChannel, MTLConfig),
    "mtl-bn-train": (MTLTrainBN, MTLConfig),
}
METHOD_NAMES = tuple(METHODS)


def build_method(name: str, profile: str = "paper") -> FewShotMethod:
    """A method by its table name, with the ``paper`` (default config) or ``quick`` budget."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
    method_class, config_class = METHODS[name]
    return method_class(config_class.quick() if profile == "quick" else config_class())
