"""Meta-transfer learning pipeline: learner, meta-train loop, resume, evaluation, bad input."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_data import TinyBenchmark, killed_at_write, pattern_split, raising_at_call
from torch import nn

from mtl_plugin.backbones import conv4
from mtl_plugin.evaluation import EvaluationConfig, EvaluationResult, evaluate, nearest_centroid
from mtl_plugin.meta_transfer import MetaTrainConfig, MetaTransferLearner, load_learner_state
from mtl_plugin.prototypes import class_prototypes, prototype_logits
from mtl_plugin.ss import SSAdapter
from mtl_plugin.tasks import build_taskset, split_support_query
from mtl_plugin.training.meta_step import MetaTrainer
from mtl_plugin.training.meta_training import meta_train
from mtl_plugin.training.run_log import NonFiniteLossError

SIDE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_benchmark(per_class: int = 8) -> TinyBenchmark:
    def split(classes, seed):
        return pattern_split(classes, per_class, SIDE, seed, noise=0.8)

    return TinyBenchmark(
        train=split(12, 0), val=split(6, 1), test=split(6, 2), train_augmented=split(12, 0), image_size=SIDE
    )


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return conv4(in_channels=1, hidden=8, image_size=SIDE)


def tiny_config(**overrides) -> MetaTrainConfig:
    values = dict(
        ways=3,
        shots=1,
        queries=3,
        inner_steps=3,
        test_inner_steps=5,
        iterations=6,
        meta_batch=2,
        val_every=3,
        val_tasks=4,
        checkpoint_every=2,
        lr_step=4,
        encoder_lr=1e-2,
        head_lr=1e-2,
    )
    values.update(overrides)
    return MetaTrainConfig(**values)


def query_loss(learner, tasks) -> float:
    total = 0.0
    for task in tasks:
        loss, _ = learner.task_loss(*task)
        total += loss.item()
    return total / len(tasks)


def fixed_tasks(dataset, config, count=6):
    taskset = build_taskset(dataset, config.ways, config.shots, config.queries, count, seed=5)
    result = []
    for i in range(count):
        (sx, sy), (qx, qy) = split_support_query(*taskset[i], shots=config.shots)
        result.append((sx, sy, qx, qy))
    return result


def test_meta_train_steps_reduce_query_loss():
    bench = tiny_benchmark()
    config = tiny_config()
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    tasks = fixed_tasks(bench.train, config)
    before = query_loss(learner, tasks)
    trainer = MetaTrainer(learner)
    for _ in range(15):
        trainer.step(tasks[:2])
        trainer.step(tasks[2:4])
        trainer.step(tasks[4:])
    assert query_loss(learner, tasks) < before


def test_inner_loop_never_reruns_the_encoder_and_only_meta_params_train():
    config = tiny_config()
    adapter = SSAdapter(tiny_backbone())
    learner = MetaTransferLearner(adapter, ways=3, config=config)
    calls = []
    adapter.backbone.register_forward_hook(lambda *args: calls.append(1))
    frozen = {n: p.clone() for n, p in adapter.backbone.named_parameters()}
    tasks = fixed_tasks(tiny_benchmark().train, config, count=2)
    MetaTrainer(learner).step(tasks)
    assert len(calls) == 2  # one encoder pass per task, whatever inner_steps is
    for name, parameter in adapter.backbone.named_parameters():
        assert torch.equal(parameter, frozen[name]), name
    assert all(p.grad is not None for p in learner.meta_parameters())


@pytest.mark.parametrize("head_init", ["prototype", "kaiming"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_reaches_ss_and_head(first_order, head_init):
    config = tiny_config(first_order=first_order, head_init=head_init)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    sx, sy, qx, qy = fixed_tasks(tiny_benchmark().train, config, count=1)[0]
    loss, _ = learner.task_loss(sx, sy, qx, qy)
    loss.backward()
    ss_grads = [p.grad for p in learner.encoder.ss_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in ss_grads)
    assert all(p.grad.abs().sum() > 0 for p in learner.head_parameters())


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_flows_through_the_prototype_init_to_the_support_features(first_order):
    config = tiny_config(first_order=first_order)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    sx, sy, qx, qy = fixed_tasks(tiny_benchmark().train, config, count=1)[0]
    support = learner.features(sx).detach().requires_grad_()
    head = learner.adapt_features(support, sy)
    F.cross_entropy(head(learner.features(qx).detach()), qy).backward()
    assert support.grad is not None and support.grad.abs().sum() > 0


def test_zero_inner_steps_are_nearest_class_mean():
    config = tiny_config()
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    sx, sy, qx, qy = fixed_tasks(tiny_benchmark().test, config, count=1)[0]
    with torch.no_grad():
        support, query = learner.features(sx), learner.features(qx)
        logits = learner.adapt_features(support, sy, steps=0)(query)
        expected = prototype_logits(query, class_prototypes(support, sy, 3))
    spread = (support - support.mean(0)).pow(2).sum(1).mean()
    # -|x - c|^2 = 2 c.x - |c|^2 - |x|^2: the head's logits lack only the per-query |x|^2, and are
    # divided by the support set's spread.
    assert torch.allclose(logits * spread - query.pow(2).sum(1, keepdim=True), expected, atol=1e-3, rtol=1e-5)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("steps", [0, 3])
def test_permuting_a_tasks_labels_permutes_the_prototype_head_logits(steps):
    config = tiny_config()
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    sx, sy, qx, qy = fixed_tasks(tiny_benchmark().test, config, count=1)[0]
    permutation = torch.tensor([2, 0, 1])  # label j becomes permutation[j]
    with torch.no_grad():
        support, query = learner.features(sx), learner.features(qx)
        logits = learner.adapt_features(support, sy, steps=steps)(query)
        permuted = learner.adapt_features(support, permutation[sy], steps=steps)(query)
    assert torch.allclose(permuted[:, permutation], logits, atol=1e-5)


def test_adapt_under_no_grad_is_detached_and_deterministic():
    config = tiny_config()
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    sx, sy, qx, qy = fixed_tasks(tiny_benchmark().test, config, count=1)[0]
    first = learner.predict(sx, sy, qx, ways=3)
    second = learner.predict(sx, sy, qx, ways=3)
    assert not first.requires_grad
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="cover every class 0..3"):
        learner.predict(sx, sy, qx, ways=4)
    kaiming = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=tiny_config(head_init="kaiming"))
    with pytest.raises(ValueError, match="3-way"):
        kaiming.predict(sx, sy, qx, ways=4)


def test_prototype_head_takes_any_number_of_classes():
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=tiny_config())
    sx, sy, qx, qy = fixed_tasks(tiny_benchmark().test, tiny_config(ways=5), count=1)[0]
    assert learner.predict(sx, sy, qx, ways=5).shape == (len(qx), 5)


def test_evaluate_twice_gives_identical_numbers():
    bench = tiny_benchmark()
    config = EvaluationConfig(ways=3, shots=1, queries=3, tasks=8, seed=3)
    predict = nearest_centroid(tiny_backbone())
    first = evaluate(predict, bench.test, config, progress=False)
    second = evaluate(predict, bench.test, config, progress=False)
    assert first.accuracies == second.accuracies
    assert len(first.accuracies) == 8
    assert first.ci95 == pytest.approx(1.96 * first.std / math.sqrt(8))
    other = evaluate(predict, bench.test, EvaluationConfig(3, 1, 3, 8, seed=4), progress=False)
    assert other.accuracies != first.accuracies


def test_bad_task_shapes_are_named(tmp_path):
    bench = tiny_benchmark(per_class=4)
    predict = nearest_centroid(tiny_backbone())
    with pytest.raises(ValueError, match="shots \\+ queries"):
        evaluate(predict, bench.test, EvaluationConfig(ways=3, shots=2, queries=3, tasks=1), progress=False)
    with pytest.raises(ValueError, match="ways=9"):
        evaluate(predict, bench.test, EvaluationConfig(ways=9, shots=1, queries=1, tasks=1), progress=False)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=tiny_config(queries=5))
    with pytest.raises(ValueError, match="shots \\+ queries"):
        meta_train(learner, bench, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def run(tmp_path, name, **overrides):
    config = tiny_config(**overrides)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    result = meta_train(learner, tiny_benchmark(), tmp_path / name, progress=False)
    return learner, result


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_resumed_run_ends_in_the_uninterrupted_state(tmp_path, hard_tasks, monkeypatch):
    full, full_result = run(tmp_path, "full", hard_tasks=hard_tasks)
    config = tiny_config(hard_tasks=hard_tasks)
    # Killed during iteration 6: iteration 5 is lost (checkpoints every 2), as after kill -9.
    killed = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    with monkeypatch.context() as patch:
        patch.setattr(MetaTrainer, "step", raising_at_call(MetaTrainer.step, 6))
        with pytest.raises(KeyboardInterrupt):
            meta_train(killed, tiny_benchmark(), tmp_path / "killed", progress=False)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["iteration"] == 4
    resumed = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    resumed_result = meta_train(resumed, tiny_benchmark(), tmp_path / "killed", resume=True, progress=False)

    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    last_resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    for name, tensor in last_full["learner"].items():
        assert torch.equal(tensor, last_resumed["learner"][name]), name
    full_metrics = pd.read_csv(tmp_path / "full" / "metrics.csv")
    resumed_metrics = pd.read_csv(tmp_path / "killed" / "metrics.csv")
    pd.testing.assert_frame_equal(full_metrics, resumed_metrics)
    assert full_result.best_accuracy == resumed_result.best_accuracy
    assert (tmp_path / "full" / "curve.png").stat().st_size > 0


def test_a_kill_after_any_write_resumes_into_the_uninterrupted_run(tmp_path, monkeypatch):
    full, _ = run(tmp_path, "full")
    writes = []
    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", killed_at_write(0, writes))
        run(tmp_path, "counted")
    assert len(writes) > 10
    for write in range(1, len(writes) + 1):
        folder = tmp_path / f"killed-{write}"
        with monkeypatch.context() as patched:
            patched.setattr(os, "replace", killed_at_write(write))
            with pytest.raises(KeyboardInterrupt):
                run(tmp_path, folder.name)
        resumed = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=tiny_config())
        first_only = (folder / "best.pt").exists() and not (folder / "last.pt").exists()
        with pytest.warns(UserWarning, match="stopped between its first two writes") if first_only else nullcontext():
            meta_train(resumed, tiny_benchmark(), folder, resume=True, progress=False)
        for name, tensor in full.state_dict().items():
            assert torch.equal(tensor, resumed.state_dict()[name]), (write, name)
        for name in ("metrics.csv", "validation.csv"):
            assert (folder / name).read_text() == (tmp_path / "full" / name).read_text(), (write, name)


def test_metrics_csv_has_a_row_per_iteration_and_validation_at_intervals(tmp_path):
    run(tmp_path, "a", iterations=5)  # checkpoints at 0, 2, 4 and 5 (the end)
    rows = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert list(rows["iteration"]) == [0, 1, 2, 3, 4, 5]
    # Iteration 0 is the pretrained model before any meta-update: validated, nothing trained.
    assert list(rows.dropna(subset=["val_accuracy"])["iteration"]) == [0, 3, 5]
    assert rows.loc[0, ["loss", "accuracy", "normal_accuracy"]].isna().all()
    assert rows["hard_accuracy"].isna().all()
    trained = rows[rows["iteration"] > 0]
    assert trained["normal_accuracy"].tolist() == pytest.approx(trained["accuracy"].tolist())


def test_validation_csv_holds_the_same_tasks_at_every_validation(tmp_path):
    run(tmp_path, "v", iterations=5)
    tasks = pd.read_csv(tmp_path / "v" / "validation.csv")
    metrics = pd.read_csv(tmp_path / "v" / "metrics.csv").dropna(subset=["val_accuracy"])
    assert sorted(tasks["iteration"].unique()) == [0, 3, 5]
    for iteration, group in tasks.groupby("iteration"):
        assert list(group["task"]) == [0, 1, 2, 3]  # val_tasks=4, in task order
        mean = metrics.loc[metrics["iteration"] == iteration, "val_accuracy"].item()
        assert group["accuracy"].mean() == pytest.approx(mean)


def test_iteration_zero_can_be_the_best_checkpoint(tmp_path):
    # An outer lr of ~0 leaves the learner where it started: iteration 0 is never beaten, and
    # best.pt holds the pretrained start rather than a later, equal model.
    learner, result = run(tmp_path, "z", iterations=3, encoder_lr=1e-12, head_lr=1e-12)
    assert result.best_iteration == 0
    best = torch.load(tmp_path / "z" / "best.pt", weights_only=True)
    assert best["iteration"] == 0


def test_equal_results_tie_whatever_the_order_of_their_tasks():
    # The mtl-ht 5-shot bench row once kept iteration 50 over an equal iteration 0: 90.00000071
    # against 90.00000011, float32 shares summed. Counts in float64 make such results tie exactly.
    accuracies = [100.0 * correct / 75 for correct in (73, 61, 70, 68, 74, 59, 66, 71)]
    first, second = EvaluationResult(accuracies), EvaluationResult(accuracies[::-1])
    assert not second.beats(first.mean) and not first.beats(second.mean)
    assert EvaluationResult([*accuracies[:-1], 100.0 * 72 / 75]).beats(first.mean)  # one query more
    assert first.beats(-math.inf)


def test_metrics_csv_separates_normal_and_hard_task_accuracy(tmp_path):
    run(tmp_path, "h", iterations=4, hard_tasks=True, meta_batch=2, hard_meta_batch=2)
    rows = pd.read_csv(tmp_path / "h" / "metrics.csv").query("iteration > 0")
    assert rows["normal_accuracy"].notna().all() and rows["hard_accuracy"].notna().all()
    # Two normal and two hard tasks per iteration: the overall accuracy is the mean of the two.
    both = (rows["normal_accuracy"] + rows["hard_accuracy"]) / 2
    assert rows["accuracy"].tolist() == pytest.approx(both.tolist())
    assert (tmp_path / "h" / "curve.png").stat().st_size > 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(iterations=6)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    original_step = MetaTrainer.step
    calls = []

    def poisoned(trainer, tasks, on_task=None):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                learner.head_metric.fill_(float("nan"))
        return original_step(trainer, tasks, on_task)

    monkeypatch.setattr(MetaTrainer, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 3.*last.pt \\(iteration 2\\)"):
        meta_train(learner, tiny_benchmark(), tmp_path / "nan", progress=False)
    state = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in state["learner"].values() if t.is_floating_point())


def test_a_diverging_inner_loop_is_named_in_training_and_at_test_time():
    config = tiny_config(inner_lr=1e6)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    support_x, support_y, query_x, query_y = fixed_tasks(tiny_benchmark().train, config, count=1)[0]
    with pytest.raises(NonFiniteLossError, match="inner loop diverged.*inner_lr 1e\\+06") as caught:
        learner.task_loss(support_x, support_y, query_x, query_y)
    assert caught.value.settings == ("inner_lr",)
    # Issue #22: test-time adaptation that diverges would score at chance; it stops too.
    with pytest.raises(NonFiniteLossError, match="inner loop diverged") as caught:
        learner.predict(support_x, support_y, query_x, ways=3)
    assert caught.value.settings == ("inner_lr",)
    learner.config.inner_lr = 0.01
    learner.task_loss(support_x, support_y, query_x, query_y)
    learner.predict(support_x, support_y, query_x, ways=3)


def test_an_exploding_outer_step_names_its_lr():
    config = tiny_config(head_lr=1e6)
    learner = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    with pytest.raises(NonFiniteLossError, match="norm of θ") as caught:
        MetaTrainer(learner).step(fixed_tasks(tiny_benchmark().train, config, count=2))
    assert caught.value.settings == ("head_lr",)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    learner, _ = run(tmp_path, "c", iterations=2, val_every=2)
    state = torch.load(tmp_path / "c" / "best.pt", weights_only=False)["learner"]
    other = MetaTransferLearner(
        SSAdapter(conv4(in_channels=1, hidden=16, image_size=SIDE)), ways=3, config=tiny_config()
    )
    with pytest.raises(ValueError, match="another architecture"):
        load_learner_state(other, state, "best.pt")
    channel = MetaTransferLearner(SSAdapter(tiny_backbone(), granularity="channel"), ways=3, config=tiny_config())
    with pytest.raises(ValueError, match="scales"):
        load_learner_state(channel, state, "best.pt")
    kaiming = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=tiny_config(head_init="kaiming"))
    with pytest.raises(ValueError, match="head_weight"):
        load_learner_state(kaiming, state, "best.pt")


def test_scratch_learner_trains_every_weight():
    config = tiny_config()
    backbone = tiny_backbone()
    learner = MetaTransferLearner(backbone, ways=3, config=config)
    before = {n: p.clone() for n, p in backbone.named_parameters()}
    MetaTrainer(learner).step(fixed_tasks(tiny_benchmark().train, config, count=2))
    changed = [n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_pretrain_trains_the_users_own_module(tmp_path):
    from mtl_plugin.training.pretrain import PretrainConfig, pretrain

    torch.manual_seed(0)
    # No feature_dim attribute and not in the registry: pretrain measures its width and trains it in place.
    mine = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    before = mine[0].weight.detach().clone()
    config = PretrainConfig(epochs=2, batch_size=16, val_tasks=2, val_ways=3, val_queries=3)
    trained = pretrain(tiny_benchmark(), config, tmp_path / "pre", progress=False, backbone=mine)
    assert trained is mine and not torch.equal(mine[0].weight, before)
    best = torch.load(tmp_path / "pre" / "best.pt", weights_only=True)
    assert best["model"]["backbone"] == "module:Sequential"
    assert all(torch.equal(best["backbone"][k], v) for k, v in mine.state_dict().items())


def test_the_mean_of_several_results_is_their_per_task_mean():
    first, second = EvaluationResult([60.0, 80.0, 40.0]), EvaluationResult([70.0, 80.0, 60.0])
    assert EvaluationResult.mean_of([first, second]).accuracies == [65.0, 80.0, 50.0]
    assert EvaluationResult.mean_of([first]) is first
    with pytest.raises(ValueError, match=r"results over \[3, 2\] tasks"):
        EvaluationResult.mean_of([first, EvaluationResult([50.0, 50.0])])
    with pytest.raises(ValueError, match=r"results over \[\] tasks"):
        EvaluationResult.mean_of([])
