"""Scaling and Shifting (SS), the meta-transfer adapter of Sun et al. (CVPR 2019), laid out as PEFT
lays out a tuner: :mod:`~mtl_plugin.ss.config` (:class:`SSConfig`, saved beside the weights),
:mod:`~mtl_plugin.ss.layers` (what SS learns for each layer type, and which layers it adapts) and
:mod:`~mtl_plugin.ss.adapter` (:class:`SSAdapter`, which wraps a backbone).

Example::

    from mtl_plugin.ss import SSAdapter, SSConfig
    adapter = SSAdapter.from_config(backbone, SSConfig(granularity="channel"))
"""

from mtl_plugin.ss.adapter import SSAdapter
from mtl_plugin.ss.config import BN_MODES, SSConfig
from mtl_plugin.ss.layers import GRANULARITIES, LayerSelection, SSShareWarning, last_block, select_modules

__all__ = [
    "SSAdapter",
    "SSConfig",
    "GRANULARITIES",
    "BN_MODES",
    "LayerSelection",
    "SSShareWarning",
    "last_block",
    "select_modules",
]
