"""Matching Networks, Meta-LSTM and TADAM: what makes each itself, fit/predict, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_data import TinyBenchmark, pattern_split, raising_at_call, tiny_context

import mtl_plugin.bench.methods.episodic as episodic
from mtl_plugin.backbones import conv4
from mtl_plugin.bench.methods import METHODS
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.matchingnet import MatchingNet, MatchingNetConfig, MatchingNetModel
from mtl_plugin.bench.methods.meta_lstm import MetaLearnerCell, MetaLSTM, MetaLSTMConfig, MetaLSTMModel
from mtl_plugin.bench.methods.metanet import preprocess_gradients
from mtl_plugin.bench.methods.tadam import TADAM, TADAMConfig, TADAMModel, auxiliary_probability
from mtl_plugin.bench.published import published_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

WAYS, QUERIES, SIZE = 3, 3, 16
TINY = {
    "matchingnet": (
        MatchingNet,
        MatchingNetConfig(hidden=8, read_steps=2, train_queries=2, max_episodes=3, checkpoint_every=1),
    ),
    "meta-lstm": (
        MetaLSTM,
        MetaLSTMConfig(hidden=8, meta_hidden=4, updates=2, train_queries=2, max_episodes=3, checkpoint_every=1),
    ),
    "tadam": (
        TADAM,
        replace(
            TADAMConfig.quick(),
            auxiliary=True,
            auxiliary_batch=8,
            lr=0.01,
            train_queries=2,
            max_episodes=3,
            checkpoint_every=1,
        ),
    ),
}


@pytest.fixture(scope="module")
def benchmark() -> TinyBenchmark:
    return TinyBenchmark(
        train=pattern_split(6, 10 + QUERIES, SIZE, seed=0, noise=0.5),
        val=pattern_split(4, 10 + QUERIES, SIZE, seed=1, noise=0.5),
        test=pattern_split(4, 10 + QUERIES, SIZE, seed=2, noise=0.5),
        image_size=SIZE,
    )


def make_context(benchmark: TinyBenchmark, work_dir: Path, shots: int = 2) -> BenchContext:
    return tiny_context(benchmark, work_dir, ways=WAYS, shots=shots, queries=QUERIES)


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# Matching Networks --------------------------------------------------------------------------


def test_full_context_embeddings_depend_on_the_rest_of_the_support_set():
    torch.manual_seed(0)
    model = MatchingNetModel(1, SIZE, MatchingNetConfig(hidden=8, read_steps=3)).eval()
    support, other = model.encoder(images(4, 0)), model.encoder(images(4, 1))
    changed = torch.cat([support[:1], other[1:]])  # the same first example, the rest replaced
    with torch.no_grad():
        g, g_changed = model.support_embedding(support), model.support_embedding(changed)
        assert not torch.allclose(g[0], g_changed[0])
        query = model.encoder(images(2, 2))
        assert not torch.allclose(model.query_embedding(query, g), model.query_embedding(query, g_changed))
    plain = MatchingNetModel(1, SIZE, MatchingNetConfig(hidden=8, fce=False))
    assert torch.equal(plain.support_embedding(changed)[0], changed[0])


def test_matching_attention_is_a_distribution_over_support_labels():
    torch.manual_seed(0)
    model = MatchingNetModel(1, SIZE, MatchingNetConfig(hidden=8, read_steps=2)).eval()
    with torch.no_grad():
        log_probabilities = model(images(6, 0), torch.tensor([0, 0, 1, 1, 2, 2]), images(5, 1), ways=3)
    assert log_probabilities.shape == (5, 3)
    assert torch.allclose(log_probabilities.exp().sum(1), torch.ones(5), atol=1e-5)


# Meta-LSTM ----------------------------------------------------------------------------------


def test_meta_learner_cell_update_equals_the_hand_computed_one():
    cell = MetaLearnerCell(hidden=2)
    with torch.no_grad():
        cell.forget_weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.3]))  # [h1, h2, θ, f_prev]
        cell.input_weight.copy_(torch.tensor([1.0, 0.2, -0.5, 0.7]))  # [h1, h2, θ, i_prev]
        cell.forget_bias.fill_(1.0)
        cell.input_bias.fill_(-2.0)
    h = torch.tensor([[0.1, 0.2], [-0.3, 0.4], [0.0, -1.0]])
    theta, gradient = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, -0.1, 2.0])
    f_prev, i_prev = torch.tensor([0.9, 0.5, 0.0]), torch.tensor([0.1, 0.0, 0.2])
    new_theta, f, i = cell(h, theta, gradient, f_prev, i_prev)
    for k in range(3):
        f_k = torch.sigmoid(0.5 * h[k, 0] - 1.0 * h[k, 1] + 2.0 * theta[k] + 0.3 * f_prev[k] + 1.0)
        i_k = torch.sigmoid(1.0 * h[k, 0] + 0.2 * h[k, 1] - 0.5 * theta[k] + 0.7 * i_prev[k] - 2.0)
        assert f[k].item() == pytest.approx(f_k.item(), abs=1e-6)
        assert i[k].item() == pytest.approx(i_k.item(), abs=1e-6)
        assert new_theta[k].item() == pytest.approx((f_k * theta[k] - i_k * gradient[k]).item(), abs=1e-6)


def test_meta_lstm_first_update_is_the_cell_update_on_the_learner_gradient():
    torch.manual_seed(0)
    config = MetaLSTMConfig(hidden=4, meta_hidden=3, updates=1)
    model = MetaLSTMModel(1, SIZE, ways=3, config=config)
    support_x, support_y = images(6, 0), torch.tensor([0, 0, 1, 1, 2, 2])
    theta = model.initial.detach().clone().requires_grad_()
    loss = F.cross_entropy(model.learner_logits(theta, support_x), support_y)
    (gradient,) = torch.autograd.grad(loss, theta)
    inputs = torch.cat(
        [preprocess_gradients(gradient, 10.0), preprocess_gradients(loss.detach().expand(theta.numel()), 10.0)], 1
    )
    h, _ = model.lstm(inputs)
    zeros = torch.zeros(theta.numel())
    expected, _, _ = model.cell(h, model.initial, gradient, zeros, zeros)
    assert torch.allclose(model.adapt(support_x, support_y), expected, atol=1e-6)


def test_meta_lstm_with_zero_head_starts_every_task_at_uniform_logits_and_learns_only_the_body():
    torch.manual_seed(0)
    model = MetaLSTMModel(1, SIZE, ways=3, config=MetaLSTMConfig(hidden=4, meta_hidden=3, updates=1, zero_head=True))
    paper = MetaLSTMModel(1, SIZE, ways=3, config=MetaLSTMConfig(hidden=4, meta_hidden=3, updates=1))
    head = sum(p.numel() for name, p in paper.learner.named_parameters() if name.startswith("head."))
    assert model.initial.numel() == paper.initial.numel() - head
    theta_0 = torch.cat([model.initial.detach(), torch.zeros(head)])
    support_x, support_y = images(6, 0), torch.tensor([0, 0, 1, 1, 2, 2])
    logits = model.learner_logits(theta_0, support_x)
    assert torch.equal(logits, torch.zeros(6, 3))  # support loss ln 3, whatever the body
    query_loss = F.cross_entropy(model(support_x, support_y, images(6, 1)), support_y)
    query_loss.backward()
    assert model.initial.grad.abs().sum() > 0


def test_meta_lstm_meta_gradient_skips_second_order_terms():
    # θ_1 = f ⊙ θ_0 - i ⊙ g with g (and the loss) treated as inputs: dθ_1/dθ_0 is diagonal,
    # f + θ_0 f (1 - f) w_F,θ - g i (1 - i) w_I,θ, with no Hessian of the learner's loss.
    torch.manual_seed(0)
    model = MetaLSTMModel(1, SIZE, ways=3, config=MetaLSTMConfig(hidden=4, meta_hidden=3, updates=1))
    support_x, support_y = images(6, 0), torch.tensor([0, 0, 1, 1, 2, 2])
    theta_0 = model.initial.detach()
    current = theta_0.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(F.cross_entropy(model.learner_logits(current, support_x), support_y), current)
    (derivative,) = torch.autograd.grad(model.adapt(support_x, support_y).sum(), model.initial)
    with torch.no_grad():
        _, f, i = model.cell(
            model.lstm(
                torch.cat(
                    [
                        preprocess_gradients(gradient, 10.0),
                        preprocess_gradients(
                            F.cross_entropy(model.learner_logits(theta_0, support_x), support_y).expand(
                                theta_0.numel()
                            ),
                            10.0,
                        ),
                    ],
                    1,
                )
            )[0],
            theta_0,
            gradient,
            torch.zeros_like(theta_0),
            torch.zeros_like(theta_0),
        )
        expected = (
            f
            + theta_0 * f * (1 - f) * model.cell.forget_weight[-2]
            - gradient * i * (1 - i) * model.cell.input_weight[-2]
        )
    assert torch.allclose(derivative, expected, atol=1e-6)


def test_meta_lstm_is_transductive_through_query_batch_statistics():
    assert MetaLSTM.transductive and not MatchingNet.transductive and not TADAM.transductive
    torch.manual_seed(0)
    model = MetaLSTMModel(1, SIZE, ways=3, config=MetaLSTMConfig(hidden=4, meta_hidden=3, updates=1))
    support_x, support_y, query_x = images(6, 0), torch.tensor([0, 0, 1, 1, 2, 2]), images(4, 1)
    with torch.no_grad():
        together = model(support_x, support_y, query_x)
        swapped = model(support_x, support_y, torch.cat([query_x[:1], images(3, 2)]))
    assert not torch.allclose(together[0], swapped[0])


# TADAM --------------------------------------------------------------------------------------


def tadam_model() -> TADAMModel:
    torch.manual_seed(0)
    return TADAMModel(conv4(in_channels=1, hidden=8, image_size=SIZE), train_classes=6).eval()


def test_identity_film_and_zero_post_multipliers_give_the_plain_network():
    model, x = tadam_model(), images(5, 0)
    plain = model.backbone(x)
    identity = [(torch.ones(8), torch.zeros(8))] * 4
    assert torch.allclose(model.features(x, identity), plain)
    # At initialisation γ₀ = β₀ = 0: whatever the task, the TEN leaves the network as it is.
    film = model.task_film(images(6, 1), torch.tensor([0, 0, 1, 1, 2, 2]), ways=3)
    assert torch.allclose(model.features(x, film), plain)
    with torch.no_grad():
        model.ten.gamma_scale.fill_(0.5)
        model.ten.beta_scale.fill_(0.5)
    film = model.task_film(images(6, 1), torch.tensor([0, 0, 1, 1, 2, 2]), ways=3)
    assert not torch.allclose(model.features(x, film), plain)
    assert torch.allclose(model.backbone(x), plain)  # conditioning never outlives its call


def test_metric_scale_alpha_sets_the_softmax_temperature():
    model = tadam_model()
    support_x, support_y, query_x = images(6, 0), torch.tensor([0, 0, 1, 1, 2, 2]), images(4, 1)
    with torch.no_grad():
        base = model(support_x, support_y, query_x, ways=3)
        model.alpha.fill_(3.0)
        scaled = model(support_x, support_y, query_x, ways=3)
    assert torch.allclose(scaled, 3.0 * base, rtol=1e-5)
    entropy = [-(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1).mean() for z in (base, scaled)]
    assert entropy[1] < entropy[0]


def test_auxiliary_task_probability_is_annealed():
    probabilities = [auxiliary_probability(t, 100) for t in range(100)]
    assert probabilities[0] == 1.0 and probabilities[5] == pytest.approx(0.9)
    assert probabilities[-1] == pytest.approx(0.9**19)
    assert all(a >= b for a, b in zip(probabilities, probabilities[1:]))


# All three ----------------------------------------------------------------------------------


def test_registered_with_published_figures():
    for name in TINY:
        assert name in METHODS and METHODS[name][1].quick().max_episodes > 0
    assert published_accuracy("mini-imagenet", "matchingnet", 5, 1).accuracy == 43.4
    assert published_accuracy("mini-imagenet", "meta-lstm", 5, 5).accuracy == 60.6
    assert published_accuracy("fc100", "tadam", 5, 10).accuracy == 61.6
    assert TADAM(TADAMConfig.quick()).describe_backbone() == "conv4 + TEN (TADAM: ResNet-12)"


@pytest.mark.parametrize("shots", [1, 5, 10])
@pytest.mark.parametrize("key", sorted(TINY))
def test_fit_and_predict(key, shots, benchmark, tmp_path):
    method_class, config = TINY[key]
    method = method_class(replace(config, max_episodes=2))
    method.fit(make_context(benchmark, tmp_path, shots=shots))
    assert len(method.losses) == 2 and all(torch.isfinite(torch.tensor(method.losses)))
    support_x = benchmark.test.dataset.images[[c * 13 + k for c in range(WAYS) for k in range(shots)]]
    support_y = torch.arange(WAYS).repeat_interleave(shots)
    query_x = benchmark.test.dataset.images[[c * 13 + 12 for c in range(WAYS)]]
    logits = method.predict(support_x, support_y, query_x, WAYS)
    assert logits.shape == (WAYS, WAYS) and torch.isfinite(logits).all()


def test_meta_lstm_refuses_a_task_of_other_ways_than_its_head(benchmark, tmp_path):
    method_class, config = TINY["meta-lstm"]
    method = method_class(replace(config, max_episodes=1))
    method.fit(make_context(benchmark, tmp_path))
    with pytest.raises(ValueError, match=r"ways=4, but this Meta-LSTM's learner has a 3-way head"):
        method.predict(images(4, 0), torch.arange(4), images(2, 1), ways=4)


class Killed(Exception):
    pass


@pytest.mark.parametrize("key", sorted(TINY))
def test_resumed_fit_gives_the_uninterrupted_weights(key, benchmark, tmp_path, monkeypatch):
    method_class, config = TINY[key]
    whole = method_class(config)
    whole.fit(make_context(benchmark, tmp_path / "whole"))

    build = episodic.build_taskset
    # Killed at episode two: its tasks are the third built.
    monkeypatch.setattr(episodic, "build_taskset", raising_at_call(build, 3, Killed))
    with pytest.raises(Killed):
        method_class(config).fit(make_context(benchmark, tmp_path / "killed"))
    monkeypatch.setattr(episodic, "build_taskset", build)
    resumed = method_class(config)
    resumed.fit(make_context(benchmark, tmp_path / "killed"))
    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
