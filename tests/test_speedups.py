"""Speed switches of the meta-train step: each gives the plain path's result to float tolerance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_pipeline import fixed_tasks, tiny_backbone, tiny_benchmark, tiny_config

from mtl_plugin.errors import UsageError
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.speedups import EncoderRunner, Speedups, per_slice_batch_statistics
from mtl_plugin.ss import SSAdapter
from mtl_plugin.training.meta_step import MetaTrainer
from mtl_plugin.training.run_log import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_thread")

# Each exact switch, turned on alone from Speedups.none().
EXACT = {"support_without_graph": True, "batch_tasks": True, "images_per_pass": 2, "channels_last": True}


def learner_for(speedups: Speedups, bn: str = "frozen", **config) -> MetaTransferLearner:
    return MetaTransferLearner(
        SSAdapter(tiny_backbone(), bn=bn), ways=3, config=tiny_config(**config), speedups=speedups
    )


def meta_gradient(speedups: Speedups, bn: str = "frozen", **config) -> tuple:
    """The loss, the meta-gradient and the buffers of one meta-step on 3 tasks, from the same weights.

    Compared before Adam's update: Adam divides each gradient by its own magnitude, so a
    gradient entry near zero turns a float rounding difference into a full step.
    """
    learner = learner_for(speedups, bn, **config)
    trainer = MetaTrainer(learner)
    trainer.optimizer.step = lambda: None
    result = trainer.step(fixed_tasks(tiny_benchmark().train, learner.config, count=3))
    return result, [p.grad for p in learner.meta_parameters()], list(learner.buffers())


def assert_same_step(plain: tuple, fast: tuple) -> None:
    assert fast[0].loss == pytest.approx(plain[0].loss, rel=1e-5)
    assert fast[0].task_accuracies == plain[0].task_accuracies
    for x, y in zip(plain[1] + plain[2], fast[1] + fast[2]):
        # Another order of the same float sums (a compiled kernel, a batched pass, another CPU's
        # vector width) moves every entry by about float32's epsilon times the tensor's magnitude,
        # not its own: an entry near zero needs the absolute tolerance of the tensor's norm
        # (one Xeon missed atol=1e-5 by 3 % on an entry of 1.6e-6 in a gradient of norm ~1-3).
        atol = 1e-5 * max(float(x.double().norm()), 1.0)
        torch.testing.assert_close(y, x, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("switch", EXACT)
@pytest.mark.parametrize(
    "head_init,first_order,bn",
    [
        ("kaiming", True, "frozen"),  # where support_without_graph applies
        ("prototype", True, "frozen"),  # the support features carry gradient: it must not apply
        ("kaiming", False, "frozen"),
        ("kaiming", True, "train"),  # BN statistics tie tasks and support to query: per-task joint passes
    ],
)
def test_each_exact_switch_gives_the_plain_paths_weights(switch, head_init, first_order, bn):
    plain = meta_gradient(Speedups.none(), bn=bn, head_init=head_init, first_order=first_order)
    fast = meta_gradient(
        dataclasses.replace(Speedups.none(), **{switch: EXACT[switch]}),
        bn=bn,
        head_init=head_init,
        first_order=first_order,
    )
    assert_same_step(plain, fast)


def test_every_exact_switch_together_gives_the_plain_paths_weights():
    plain = meta_gradient(Speedups.none(), head_init="kaiming", first_order=True)
    fast = meta_gradient(Speedups(**EXACT), head_init="kaiming", first_order=True)
    assert_same_step(plain, fast)


def test_images_per_pass_splits_the_encoder_batch_only_with_frozen_bn():
    def passes(bn):
        runner = EncoderRunner(SSAdapter(tiny_backbone(), bn=bn).train(), Speedups(images_per_pass=4))
        sizes = []
        runner.encoder.backbone.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
        runner(torch.randn(10, 1, 16, 16))
        return sizes

    assert passes("frozen") == [4, 4, 2]
    assert passes("train") == [10]  # batch statistics over the whole batch, as without the switch


def test_support_without_graph_encodes_the_support_under_no_grad_only_where_it_applies():
    def grad_modes(**config):
        learner = learner_for(Speedups(), **config)
        modes = []
        learner.encoder.backbone.register_forward_hook(lambda *args: modes.append(torch.is_grad_enabled()))
        MetaTrainer(learner).step(fixed_tasks(tiny_benchmark().train, learner.config, count=1))
        return modes

    assert grad_modes(head_init="kaiming", first_order=True) == [False, True]  # support, then query
    assert grad_modes(head_init="prototype", first_order=True) == [True]  # one joint pass
    assert grad_modes(head_init="kaiming", first_order=False) == [True]


def test_batched_tasks_are_one_pass():
    def passes(speedups, bn):
        learner = learner_for(speedups, bn)
        calls = []
        learner.encoder.backbone.register_forward_hook(lambda *args: calls.append(1))
        MetaTrainer(learner).step(fixed_tasks(tiny_benchmark().train, learner.config, count=3))
        return len(calls)

    assert passes(Speedups(batch_tasks=True), "frozen") == 1
    assert passes(Speedups(batch_tasks=False), "frozen") == 3
    assert passes(Speedups(batch_tasks=True), "train") == 1


def test_sliced_batch_statistics_equal_one_pass_per_slice():
    torch.manual_seed(0)
    images = torch.randn(9, 1, 16, 16)
    apart, together = tiny_backbone().train(), tiny_backbone().train()
    expected = torch.cat([apart(images[:4]), apart(images[4:])])
    with per_slice_batch_statistics(together, [4, 5]):
        output = together(images)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for name, buffer in apart.named_buffers():  # running statistics updated slice by slice
        torch.testing.assert_close(dict(together.named_buffers())[name], buffer, rtol=1e-5, atol=1e-6)
    together(images)  # outside the block: one pass, one set of statistics again
    assert not any("forward" in module.__dict__ for module in together.modules())


def test_a_hard_task_group_is_drawn_only_after_the_normal_tasks_are_recorded():
    config = tiny_config()
    tasks = fixed_tasks(tiny_benchmark().train, config, count=4)
    recorded = []

    class MetaBatchLike:
        def groups(self):
            yield tasks[:2]
            assert len(recorded) == 2, "the hard tasks were drawn before the normal ones were recorded"
            yield tasks[2:]

    learner = MetaTransferLearner(
        SSAdapter(tiny_backbone()), ways=3, config=config, speedups=Speedups(batch_tasks=True)
    )
    result = MetaTrainer(learner).step(MetaBatchLike(), on_task=lambda task, logits, y: recorded.append(task))
    assert result.tasks == 4 and recorded == tasks


def test_a_diverging_task_in_a_batch_is_named_by_its_place():
    config = tiny_config(head_init="kaiming")
    tasks = fixed_tasks(tiny_benchmark().train, config, count=3)
    sx, sy, qx, qy = tasks[1]
    tasks[1] = (sx, sy, qx * float("nan"), qy)
    learner = MetaTransferLearner(
        SSAdapter(tiny_backbone()), ways=3, config=config, speedups=Speedups(batch_tasks=True)
    )
    with pytest.raises(NonFiniteLossError, match="task 2 of the meta-batch"):
        MetaTrainer(learner).step(tasks)
    assert all(p.grad is None for p in learner.meta_parameters())


def test_output_scaling_is_the_same_function_and_gradient_as_weight_scaling():
    torch.manual_seed(1)
    by_weight = SSAdapter(tiny_backbone(), granularity="channel")
    by_output = SSAdapter(tiny_backbone(), granularity="channel", output_scaling=True)
    with torch.no_grad():
        for a, b in zip(by_weight.ss_parameters(), by_output.ss_parameters()):
            a.add_(0.3 * torch.randn_like(a))
            b.copy_(a)
    images = torch.randn(6, 1, 16, 16)
    out_w, out_o = by_weight(images), by_output(images)
    torch.testing.assert_close(out_w, out_o, rtol=1e-5, atol=1e-5)
    out_w.square().sum().backward()
    out_o.square().sum().backward()
    for a, b in zip(by_weight.ss_parameters(), by_output.ss_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_output.fold().eval()(images), out_w, rtol=1e-5, atol=1e-5)
    # The hooks live for one call only: the backbone alone is the plain backbone again.
    assert not any(module._forward_hooks for module in by_output.backbone.modules())


def test_output_scaling_needs_channel_granularity():
    with pytest.raises(ValueError, match="granularity='channel'"):
        SSAdapter(tiny_backbone(), output_scaling=True)


def test_autocast_bf16_keeps_float32_features_close_to_float32():
    adapter = SSAdapter(tiny_backbone()).eval()
    images = torch.randn(4, 1, 16, 16)
    exact = EncoderRunner(adapter, Speedups.none())(images)
    low = EncoderRunner(adapter, Speedups(autocast="bf16"))(images)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=5e-2, atol=5e-2)


def test_bad_speedups_are_refused():
    with pytest.raises(UsageError, match="autocast='int8'"):
        Speedups(autocast="int8")
    with pytest.raises(UsageError, match="images_per_pass=0"):
        Speedups(images_per_pass=0)


def test_compile_that_fails_warns_and_runs_eagerly(monkeypatch):
    adapter = SSAdapter(tiny_backbone()).eval()
    images = torch.randn(2, 1, 16, 16)

    def broken(module):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    runner = EncoderRunner(adapter, Speedups(compile=True))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        features = runner(images)
    torch.testing.assert_close(features, adapter(images))
    runner(images)  # warned once: later calls run eagerly without trying again


def test_speedups_add_nothing_to_the_state_dict():
    plain = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=tiny_config(), speedups=Speedups.none())
    fast = MetaTransferLearner(
        SSAdapter(tiny_backbone()), ways=3, config=tiny_config(), speedups=Speedups(compile=True, autocast="bf16")
    )
    assert list(plain.state_dict()) == list(fast.state_dict())


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the eager fallback's warning fails the test
def test_a_compiled_encoder_gives_the_eager_meta_step():
    plain = meta_gradient(Speedups.none())
    compiled = meta_gradient(Speedups(compile=True))
    assert_same_step(plain, compiled)
