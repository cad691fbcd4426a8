"""The ``mtl``, ``mtl-ht`` and ``scratch`` benchmark methods on tiny in-memory data."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from test_pipeline import SIDE, tiny_benchmark  # noqa: F401 (fixture)
from tiny_data import tiny_context

from mtl_plugin.backbones import conv4
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.mtl import MTL, MTLConfig, MTLHardTasks, Scratch
from mtl_plugin.tasks import build_taskset, split_support_query
from mtl_plugin.training.meta_step import MetaTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def context(tmp_path, name) -> BenchContext:
    def pretrained():
        torch.manual_seed(0)
        return conv4(in_channels=1, hidden=8, image_size=SIDE)

    return tiny_context(
        tiny_benchmark(),
        tmp_path / name,
        ways=3,
        shots=1,
        queries=3,
        pretrained_backbone=pretrained,
        backbone_name="conv4",
    )


def tiny_method_config() -> MTLConfig:
    quick = MTLConfig.quick()
    return replace(
        quick,
        meta=replace(
            quick.meta, iterations=4, val_every=2, val_tasks=3, checkpoint_every=2, inner_steps=3, test_inner_steps=3
        ),
    )


@pytest.mark.parametrize("method_class", [MTL, MTLHardTasks, Scratch])
def test_method_fits_predicts_and_records_its_validation_curve(tmp_path, method_class):
    method = method_class(tiny_method_config())
    ctx = context(tmp_path, method_class.name)
    with pytest.raises(RuntimeError, match="before fit"):
        method.predict(torch.zeros(3, 1, SIDE, SIDE), torch.arange(3), torch.zeros(2, 1, SIDE, SIDE), 3)
    method.fit(ctx)
    (sx, sy), (qx, qy) = split_support_query(*build_taskset(ctx.benchmark.test, 3, 1, 3, 1, seed=0)[0], 1)
    logits = method.predict(sx, sy, qx, ways=3)
    assert logits.shape == (len(qx), 3)
    curve = pd.read_csv(ctx.work_dir / "metrics.csv")
    # Validated before any update (iteration 0), then every val_every.
    assert list(curve.dropna(subset=["val_accuracy"])["iteration"]) == [0, 2, 4]
    assert method.describe_backbone() == "conv4"


def test_scratch_does_not_use_the_pretrained_backbone(tmp_path):
    ctx = context(tmp_path, "scratch")
    ctx.pretrained_backbone = lambda: pytest.fail("scratch must not pretrain")
    Scratch(tiny_method_config()).fit(ctx)
    assert not Scratch.uses_pretraining and MTL.uses_pretraining


def test_mtl_meta_trains_on_as_many_tasks_per_iteration_as_mtl_ht(tmp_path, monkeypatch):
    counts = {}
    original = MetaTrainer.step

    def counting(self, tasks, on_task=None):
        result = original(self, tasks, on_task)
        counts.setdefault(self.config.hard_tasks, set()).add(result.tasks)
        return result

    monkeypatch.setattr(MetaTrainer, "step", counting)
    config = tiny_method_config()
    for method_class in (MTL, MTLHardTasks):
        method_class(config).fit(context(tmp_path, method_class.name))
    k, k_hard = config.meta.meta_batch, config.meta.hard_meta_batch
    assert counts == {False: {k + k_hard}, True: {k + k_hard}}
    rows = pd.read_csv(tmp_path / "mtl-ht" / "metrics.csv").query("iteration > 0")
    assert rows["hard_accuracy"].notna().all()
