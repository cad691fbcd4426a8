"""The registry of ``mtl bench`` rows: methods, named config presets, and the read-only METHODS view."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mtl_plugin.bench.methods import (
    METHODS,
    build_method,
    list_methods,
    method_spec,
    register_method,
    register_preset,
    registry,
)
from mtl_plugin.bench.methods.base import TestTimeMethod
from mtl_plugin.bench.methods.mtl import MTL, MTLConfig
from mtl_plugin.bench.methods.protonet import ProtoNet, ProtoNetConfig


@pytest.fixture()
def own_registry(monkeypatch):
    """Registrations made by a test vanish with it: METHODS and the bench read the registry live."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_a_registered_method_is_a_row_in_registration_order(own_registry):
    @register_method("my-probe", config=ProtoNetConfig)
    class MyProbe(TestTimeMethod):
        name = "my-probe"

        def predict(self, support_x, support_y, query_x, ways):
            raise NotImplementedError

    assert list_methods()[-1] == "my-probe" and list(METHODS)[-1] == "my-probe"
    assert METHODS["my-probe"] == (MyProbe, ProtoNetConfig)
    assert method_spec("my-probe").uses_pretraining and not method_spec("my-probe").ablation_only
    with pytest.raises(ValueError, match="'my-probe' is registered already; pick another name"):
        register_method("my-probe", config=ProtoNetConfig)(ProtoNet)


def test_a_preset_is_its_base_method_on_a_changed_config_under_its_own_name(own_registry):
    @register_preset("mtl-fast", base="mtl-channel", adapts="SS [Θ; θ], channel, 2x lr")
    def fast(config: MTLConfig) -> MTLConfig:
        return replace(config, meta=replace(config.meta, encoder_lr=2 * config.meta.encoder_lr))

    method = build_method("mtl-fast", profile="quick")
    assert type(method) is MTL and method.name == "mtl-fast" and method.adapts == "SS [Θ; θ], channel, 2x lr"
    # Presets of presets compose, the base's first; the profile config itself is left as it was.
    assert method.config.ss.granularity == "channel"
    assert method.config.meta.encoder_lr == 2 * MTLConfig.quick().meta.encoder_lr
    assert METHODS["mtl-fast"][0](MTLConfig.quick()).config == method.config
    with pytest.raises(ValueError, match="unknown method 'nope'; known: scratch"):
        register_preset("x", base="nope")(fast)


def test_the_ablation_rows_are_presets_of_mtl_not_subclasses():
    for name in ("ft-head", "ft-last", "ft-all", "ss-last", "mtl-channel", "mtl-bn-train"):
        assert method_spec(name).method is MTL and method_spec(name).ablation_only
        assert type(build_method(name, "quick")) is MTL
    assert method_spec("mtl-ht-reuse").method is method_spec("mtl-ht").method
    assert build_method("ft-last").config.adapt == "finetune" and build_method("ft-last").config.blocks == "last"


def test_mtl_config_names_a_bad_adapt_or_blocks_and_the_remedy():
    with pytest.raises(ValueError, match="adapt='fine': give one of 'ss', 'finetune'"):
        MTLConfig(adapt="fine")
    with pytest.raises(ValueError, match="blocks='first': give one of 'all', 'last', 'none'"):
        MTLConfig(blocks="first")
    with pytest.raises(ValueError, match='give adapt="finetune"'):
        MTLConfig(blocks="none")


def test_methods_is_read_only_and_a_later_row_can_be_benched_by_name(own_registry):
    from mtl_plugin.bench.runner import BenchConfig

    with pytest.raises(TypeError):
        METHODS["x"] = (ProtoNet, ProtoNetConfig)
    register_preset("mtl-bn-train-2", base="mtl-bn-train")(lambda config: config)
    assert BenchConfig.quick(methods=["mtl-bn-train-2"]).rows == ("mtl-bn-train-2",)
    assert method_spec("mtl-bn-train-2").adapts == "SS [Θ; θ], bn=train"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope")
