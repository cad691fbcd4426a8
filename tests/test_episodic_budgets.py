"""Episode budgets of the methods trained from scratch: counted, checkpointed, resumed, and learning."""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_data import TinyBenchmark, pattern_split, tiny_context
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mtl_plugin.bench.methods.base import BenchContext, fit_count, fit_settings
from mtl_plugin.bench.methods.episodic import (
    budget_decay,
    fit_episodically,
    sample_episode,
    tail_average,
    train_episodes,
)
from mtl_plugin.bench.methods.maml import MAML, MAMLConfig
from mtl_plugin.bench.methods.metanet import MetaNet, MetaNetConfig, MetaNetModel
from mtl_plugin.bench.methods.protonet import ProtoNetConv4, ProtoNetConv4Config
from mtl_plugin.tasks import build_taskset, split_support_query

pytestmark = pytest.mark.usefixtures("one_thread")

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 3, 16
CONFIGS = [MAMLConfig, MetaNetConfig, ProtoNetConv4Config]


@pytest.fixture(scope="module")
def benchmark() -> TinyBenchmark:
    return TinyBenchmark(
        train=pattern_split(8, SHOTS + 6, SIZE, seed=0, noise=0.5),
        val=pattern_split(4, SHOTS + QUERIES, SIZE, seed=1, noise=0.5),
        test=pattern_split(4, SHOTS + QUERIES, SIZE, seed=2, noise=0.5),
        image_size=SIZE,
    )


def make_context(benchmark: TinyBenchmark, work_dir: Path, seed: int = 0) -> BenchContext:
    return tiny_context(benchmark, work_dir, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=seed)


@pytest.mark.parametrize("config_class", CONFIGS)
def test_budgets_count_episodes_never_seconds(config_class):
    for config in (config_class(), config_class.quick()):
        names = [f.name for f in fields(config)]
        assert "max_episodes" in names and config.max_episodes > 0
        assert not [n for n in names if re.search(r"budget_s|time_budget|seconds", n)], names
    assert not [p for p in inspect.signature(train_episodes).parameters if "budget" in p or "time" in p]


def test_budget_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="max_episodes=-1"):
        train_episodes(lambda tasks: 0.0, lambda episode: None, {}, tmp_path / "c.pt", {}, max_episodes=-1)
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        train_episodes(
            lambda tasks: 0.0, lambda episode: None, {}, tmp_path / "c.pt", {}, max_episodes=1, checkpoint_every=0
        )


class Killed(Exception):
    pass


def linear_run(tmp_path: Path, kill_at: int | None = None) -> tuple[list[float], torch.nn.Module]:
    """A small regression trained on seeded per-episode data; raises Killed before episode ``kill_at``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def make_tasks(episode: int) -> torch.Tensor:
        return torch.randn(8, 5, generator=torch.Generator().manual_seed(episode))

    def step(batch: torch.Tensor) -> float:
        if kill_at is not None and len(seen) == kill_at:
            raise Killed
        seen.append(batch)
        loss = F.mse_loss(model(batch[:, :4]).squeeze(1), batch[:, 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    seen: list[torch.Tensor] = []
    losses = train_episodes(
        step,
        make_tasks,
        {"model": model, "optimizer": optimizer},
        tmp_path / "c.pt",
        {"run": "linear"},
        max_episodes=7,
        checkpoint_every=3,
        progress=False,
    )
    return losses, model


def test_a_killed_run_resumes_into_the_uninterrupted_one(tmp_path):
    whole_losses, whole = linear_run(tmp_path / "whole")
    with pytest.raises(Killed):
        linear_run(tmp_path / "killed", kill_at=5)  # the last checkpoint holds episode 3
    resumed_losses, resumed = linear_run(tmp_path / "killed")
    assert resumed_losses == whole_losses and len(whole_losses) == 7
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_two_seeds_never_share_an_episode(benchmark, tmp_path):
    # With one sampler per (seed, episode), seed 1 must not replay seed 0's tasks one episode later.
    drawn = {}
    for seed in (0, 1):
        tasks = []

        def step(sampler) -> float:
            tasks.append(sampler.sample()[0])  # noqa: B023 (called within this iteration)
            return 0.0

        config = ProtoNetConv4Config(max_episodes=3, checkpoint_every=3)
        fit_episodically(
            "probe",
            make_context(benchmark, tmp_path / str(seed), seed=seed),
            config,
            step,
            {},
            ways=WAYS,
            queries=QUERIES,
        )
        drawn[seed] = tasks
    assert not torch.equal(drawn[0][1], drawn[1][0])
    assert not torch.equal(drawn[0][2], drawn[1][1])


def decayed_run(benchmark, work_dir: Path, kill_at=None) -> list[float]:
    """The learning rate of each episode of a 20-episode run whose last half decays."""
    config = MetaNetConfig(max_episodes=20, checkpoint_every=4, budget_decay=0.5)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rates: list[float] = []

    def step(tasks) -> float:
        if kill_at is not None and len(rates) == kill_at:
            raise Killed
        rates.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        return 0.0

    fit_episodically(
        "probe",
        make_context(benchmark, work_dir),
        config,
        step,
        {"model": model, "optimizer": optimizer},
        ways=WAYS,
        queries=QUERIES,
        scheduler=budget_decay(optimizer, config),
    )
    return rates


def test_budget_decay_takes_the_rate_to_zero_by_the_end_and_resumes_where_it_was(benchmark, tmp_path):
    rates = decayed_run(benchmark, tmp_path / "whole")
    lr = MetaNetConfig().lr
    assert rates[:11] == [lr] * 11
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 0.05 * lr
    with pytest.raises(Killed):
        decayed_run(benchmark, tmp_path / "killed", kill_at=14)  # the last checkpoint holds episode 12
    assert decayed_run(benchmark, tmp_path / "killed") == rates[12:]


def test_budget_decay_is_off_by_default_and_checked():
    optimizer = torch.optim.Adam(torch.nn.Linear(2, 1).parameters())
    assert budget_decay(optimizer, MetaNetConfig()) is None
    with pytest.raises(ValueError, match="budget_decay=1.5"):
        budget_decay(optimizer, MetaNetConfig(budget_decay=1.5))


@dataclass
class AveragedProbe:
    max_episodes: int = 10
    checkpoint_every: int = 3
    average_last: float = 0.4


def averaged_run(benchmark, work_dir: Path, kill_at=None) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A 10-episode run averaging its last 4 iterates; the model and each episode's weights."""
    config = AveragedProbe()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    iterates: list[torch.Tensor] = []

    def step(tasks) -> float:
        if kill_at is not None and len(iterates) == kill_at:
            raise Killed
        optimizer.zero_grad()
        model(torch.tensor([[1.0, 2.0], [3.0, -1.0]])).pow(2).sum().backward()
        optimizer.step()
        iterates.append(torch.cat([t.detach().flatten().clone() for t in model.state_dict().values()]))
        return 0.0

    fit_episodically(
        "probe",
        make_context(benchmark, work_dir),
        config,
        step,
        {"model": model, "optimizer": optimizer},
        WAYS,
        QUERIES,
    )
    return model, iterates


def test_a_tail_average_ends_as_the_mean_of_the_last_iterates_and_resumes_into_it(benchmark, tmp_path):
    model, iterates = averaged_run(benchmark, tmp_path / "whole")
    state = model.state_dict()
    flat = torch.cat([t.flatten().float() for t in state.values()])
    expected = torch.stack(iterates[-4:]).mean(0)
    floats = torch.cat([torch.full((t.numel(),), t.is_floating_point()) for t in state.values()])
    # Parameters and batch-norm running statistics are the mean of episodes 6-9 ...
    scale = expected[floats].abs().max()
    torch.testing.assert_close(flat[floats], expected[floats], rtol=0, atol=1e-6 * scale)
    assert not torch.allclose(flat[floats], iterates[-1][floats])
    # ... and the batch counter is the last one's.
    assert state["1.num_batches_tracked"] == 10
    with pytest.raises(Killed):
        averaged_run(benchmark, tmp_path / "killed", kill_at=8)  # the last checkpoint holds episode 6
    resumed, _ = averaged_run(benchmark, tmp_path / "killed")
    assert all(torch.equal(a, b) for a, b in zip(state.values(), resumed.state_dict().values()))
    # A finished run loads into the same average.
    reused, none = averaged_run(benchmark, tmp_path / "whole")
    assert none == [] and all(torch.equal(a, b) for a, b in zip(state.values(), reused.state_dict().values()))


def test_a_tail_average_is_off_by_default_and_checked():
    model = torch.nn.Linear(2, 1)
    assert tail_average(model, MetaNetConfig()) is None
    with pytest.raises(ValueError, match="average_last=1.5"):
        tail_average(model, AveragedProbe(average_last=1.5))
    with pytest.raises(ValueError, match=r"needs the model to average: pass it as state\['model'\]"):
        tail_average(None, AveragedProbe())


TINY_METANET = MetaNetConfig(
    filters=8, hidden=8, max_ways=5, meta_hidden=6, train_queries=2, max_episodes=2, checkpoint_every=1
)
TINY = {
    "protonet-conv4": (
        ProtoNetConv4,
        ProtoNetConv4Config(hidden=8, train_ways=WAYS, train_queries=2, max_episodes=2, checkpoint_every=1),
    ),
    "maml": (
        MAML,
        replace(MAMLConfig.quick(), hidden=8, meta_batch=2, train_queries=2, max_episodes=2, checkpoint_every=1),
    ),
    "metanet": (MetaNet, TINY_METANET),
}


def test_a_meta_batch_update_takes_the_mean_gradient_of_its_tasks(benchmark, tmp_path):
    # No clipping, so that the update's gradient is the raw mean.
    config = replace(TINY_METANET, meta_batch=2, max_episodes=1, gradient_clip=1e9)
    seen: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        # u's classifier head reaches no key, so it gets no gradient: count that as zeros.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])

    hook = register_optimizer_step_pre_hook(record)
    try:
        method = MetaNet(config)
        method.fit(make_context(benchmark, tmp_path))
    finally:
        hook.remove()

    # The same initial model and the first two tasks of episode 0's sampler (seed 0).
    torch.manual_seed(0)
    model = MetaNetModel(1, SIZE, config)
    tasks = build_taskset(benchmark.train, WAYS, SHOTS, config.train_queries, seed=0)
    losses = []
    for _ in range(2):
        support_x, support_y, query_x, query_y = sample_episode(tasks, SHOTS, torch.device("cpu"))
        losses.append(F.cross_entropy(model(support_x, support_y, query_x, WAYS), query_y))
    mean = (losses[0] + losses[1]) / 2
    params = list(model.parameters())
    expected = torch.autograd.grad(mean, params, retain_graph=True, allow_unused=True, materialize_grads=True)
    first_alone = torch.autograd.grad(losses[0], params, allow_unused=True, materialize_grads=True)

    assert len(seen) == 1 and method.losses == pytest.approx([mean.item()], rel=1e-6)
    norm = torch.cat([g.flatten() for g in expected]).norm()
    for got, want in zip(seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * norm)
    assert not all(torch.allclose(a, b) for a, b in zip(expected, first_alone)), "both tasks should count"


@pytest.mark.parametrize("key", ["maml", "metanet"])
def test_a_meta_batch_below_one_is_refused(key, benchmark, tmp_path):
    method_class, config = TINY[key]
    with pytest.raises(ValueError, match=r"meta_batch=0 must be >= 1 \(tasks per update\)"):
        method_class(replace(config, meta_batch=0)).fit(make_context(benchmark, tmp_path))


@pytest.mark.parametrize("key", sorted(TINY))
def test_checkpoints_load_without_running_code(key, benchmark, tmp_path):
    method_class, config = TINY[key]
    method_class(config).fit(make_context(benchmark, tmp_path))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["fingerprint"]["config"] == fit_settings(config)
    assert saved["episode"] == config.max_episodes and saved["finished"]


@pytest.mark.parametrize("steps", [None, 3], ids=["quick", "3-steps"])
def test_trained_maml_support_loss_does_not_rise_over_its_test_steps(steps, benchmark, tmp_path):
    # The quick profile's inner loop (step size, training and test steps) on a small Conv4,
    # and the same with three inner steps in training and at test time.
    config = replace(MAMLConfig.quick(), hidden=8, train_queries=3, max_episodes=40, checkpoint_every=40)
    if steps is not None:
        config = replace(config, train_steps=steps, test_steps=steps)
    method = MAML(config)
    method.fit(make_context(benchmark, tmp_path))
    tasks = build_taskset(benchmark.val, WAYS, SHOTS, QUERIES, num_tasks=5, seed=0)
    for index in range(5):
        (support_x, support_y), _ = split_support_query(*tasks[index], SHOTS)
        losses = method.support_losses(support_x, support_y)
        assert len(losses) == config.test_steps + 1
        assert all(after <= before + 1e-3 for before, after in zip(losses, losses[1:])), losses
        assert losses[-1] < losses[0]


def test_each_further_fit_of_a_cell_has_its_own_seed_below_2_32_and_its_own_folder(tmp_path):
    context = tiny_context(None, tmp_path / "5w1s-abc", ways=5, shots=1, queries=2, seed=2**32 - 2)
    assert context.for_fit(0) is context
    second, third = context.for_fit(1), context.for_fit(2)
    assert (second.seed, third.seed) == ((2**32 - 2 + 100_003) % 2**32, (2**32 - 2 + 200_006) % 2**32)
    assert (second.work_dir.name, third.work_dir.name) == ("5w1s-abc-fit2", "5w1s-abc-fit3")
    assert second.work_dir.parent == tmp_path and (second.shots, second.ways) == (1, 5)


def test_a_fit_is_named_by_every_setting_but_the_number_of_fits_its_cell_averages():
    quick = MetaNetConfig.quick()
    assert fit_settings(quick) == fit_settings(replace(quick, fits=5))
    assert fit_settings(quick) != fit_settings(replace(quick, lr=quick.lr / 2))
    assert "fits" not in fit_settings(quick) and fit_settings(quick)["lr"] == quick.lr
    assert fit_settings(ProtoNetConv4Config.quick()) == asdict(ProtoNetConv4Config.quick())  # no such field


def test_a_row_is_fitted_as_often_as_its_config_says():
    assert fit_count(MetaNetConfig()) == 1  # the paper's: one fit
    assert fit_count(MetaNetConfig.quick()) == 1  # the quick bench fits every row once
    assert fit_count(replace(MetaNetConfig.quick(), fits=8)) == 8
    assert fit_count(ProtoNetConv4Config.quick()) == 1  # no such field: one fit
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"MetaNetConfig\(fits={bad!r}\): a cell averages 1 or more fits"):
            fit_count(replace(MetaNetConfig(), fits=bad))
