"""The ablation rows (what to adapt after pretraining), their learned-parameter counts and claims."""

from __future__ import annotations

import pytest
import torch
from test_methods_mtl import context, tiny_method_config
from test_pipeline import SIDE
from torch import nn

from mtl_plugin.backbones import build_backbone, conv4
from mtl_plugin.bench.ablation_report import ablation_note, paired_comparisons
from mtl_plugin.bench.methods import METHODS
from mtl_plugin.bench.methods.ablation import ABLATION_SUITE, FinetunedLayers
from mtl_plugin.tasks import build_taskset, split_support_query

pytestmark = pytest.mark.usefixtures("one_thread")

# conv4(in_channels=1, hidden=8) at 16 px: convs of 72+8 and 3 x (576+8) weights, 4 BatchNorms of 16,
# 8-d features (θ = d). Φ: (8+8) + 3 x (64+8) at kernel granularity, 4 x (8+8) at channel granularity.
EXPECTED_COUNTS = {
    "ft-head": 8,
    "ft-last": 584 + 8,
    "ft-all": 1896 + 8,
    "ss-last": 72 + 8,
    "mtl": 232 + 8,
    "mtl-ht": 232 + 8,
    "mtl-ht-reuse": 232 + 8,
    "mtl-channel": 64 + 8,
    "mtl-bn-train": 232 + 8,
}


def _build(name):
    method_class, _ = METHODS[name]
    return method_class(tiny_method_config())


def test_learned_parameters_are_what_the_outer_loop_updates(tmp_path):
    counts = {name: _build(name).learned_parameters(context(tmp_path, name)) for name in ABLATION_SUITE}
    # scratch builds its own backbone by name (the default Conv4 width, 64-d features), not the tiny one.
    fresh = build_backbone("conv4", in_channels=1, image_size=SIDE)
    assert counts.pop("scratch") == sum(p.numel() for p in fresh.parameters()) + fresh.feature_dim
    assert counts == EXPECTED_COUNTS
    # The paper's ordering: SS learns far fewer parameters than FT of the same layers.
    assert counts["ss-last"] < counts["ft-last"] and counts["mtl"] < counts["ft-all"]


@pytest.mark.parametrize(
    "name", ["ft-head", "ft-last", "ft-all", "ss-last", "mtl-ht-reuse", "mtl-channel", "mtl-bn-train"]
)
def test_ablation_rows_meta_train_only_what_they_name(tmp_path, name):
    method = _build(name)
    ctx = context(tmp_path, name)
    pretrained = ctx.pretrained_backbone().state_dict()
    method.fit(ctx)
    (sx, sy), (qx, qy) = split_support_query(*build_taskset(ctx.benchmark.test, 3, 1, 3, 1, seed=0)[0], 1)
    assert method.predict(sx, sy, qx, ways=3).shape == (len(qx), 3)
    # What the outer loop updated is in the run's last state: the best one fit() leaves in the
    # learner may be iteration 0, the pretrained start itself.
    method.learner.load_state_dict(torch.load(ctx.work_dir / "last.pt", weights_only=True)["learner"])
    backbone = method.learner.encoder.backbone
    changed = {
        key
        for key, value in backbone.state_dict().items()
        if key.endswith("weight") and not torch.equal(value, pretrained[key])
    }
    if name == "ft-head" or not name.startswith("ft"):
        assert changed == set()  # SS rows and FT [θ] leave every pretrained weight as it was
    elif name == "ft-last":
        assert changed == {"layers.12.weight"}  # Conv4's last block: its conv
    else:
        assert {"layers.0.weight", "layers.12.weight"} <= changed
    if name == "mtl-bn-train":
        assert method.learner.encoder.bn == "train"
    if name == "mtl-channel":
        assert method.learner.encoder.granularity == "channel"
    if name == "mtl-ht-reuse":
        assert method.meta_config(ctx).hard_task_mode == "reuse" and method.meta_config(ctx).hard_tasks


def test_finetuned_layers_keep_batchnorm_frozen_and_name_bad_layers():
    encoder = FinetunedLayers(conv4(in_channels=1, hidden=8, image_size=SIDE), layers=("layers.12",))
    encoder.train()
    assert all(not m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == [
        "backbone.layers.12.weight",
        "backbone.layers.12.bias",
    ]
    with pytest.raises(ValueError, match="'layer4'.*top level: layers"):
        FinetunedLayers(conv4(in_channels=1, hidden=8, image_size=SIDE), layers=("layer4",))


def test_ablation_rows_stay_out_of_the_comparison_suite():
    from mtl_plugin.bench.runner import SUITES, BenchConfig

    assert SUITES["ablation"] == ABLATION_SUITE
    assert not set(SUITES["comparison"]) & (set(ABLATION_SUITE) - {"mtl", "mtl-ht", "scratch"})
    assert {"mtl", "mtl-ht", "scratch", "protonet", "maml"} <= set(SUITES["comparison"])
    assert set(SUITES["comparison"]) | set(ABLATION_SUITE) == set(METHODS)
    assert BenchConfig.quick().rows == SUITES["comparison"]
    assert BenchConfig.quick(suite="ablation").rows == ABLATION_SUITE
    assert BenchConfig.quick(suite="ablation", methods=["mtl"]).rows == ("mtl",)
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        BenchConfig(suite="nope")


def test_claims_are_paired_differences_with_a_verdict():
    n = 50
    accuracies = {
        ("mtl", 1): [60.0 + (i % 5) for i in range(n)],
        ("ft-all", 1): [50.0 + (i % 5) for i in range(n)],  # 10 points below on every task
        ("scratch", 1): [70.0 + (i % 5) for i in range(n)],  # 10 points above: the claim is reversed
        ("ft-head", 1): [60.0 + ((i + 1) % 5) for i in range(n)],  # the same on average
    }
    frame = paired_comparisons(accuracies, shots=(1,)).set_index("worse")
    assert frame.loc["ft-all", "verdict"] == "holds" and frame.loc["ft-all", "difference"] == 10.0
    assert frame.loc["scratch", "verdict"] == "reversed"
    assert frame.loc["ft-head", "verdict"] == "within CI"
    with pytest.raises(ValueError, match="same tasks"):
        paired_comparisons({("mtl", 1): [1.0, 2.0], ("ft-all", 1): [1.0]}, shots=(1,))

    comparisons, note = ablation_note(accuracies, (1,), {"mtl": 240, "ft-all": 1904})
    assert "ft-all (-10.00 ± 0.00)" in note and "scratch (+10.00 ± 0.00)" in note
    assert "within the CI: ft-head" in note
    assert "mtl 240 against ft-all 1,904 (12.6%)" in note
    assert len(comparisons) == 3 + 3  # three claims, three rows against mtl
