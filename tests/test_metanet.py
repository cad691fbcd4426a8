"""Meta Networks: shapes, the memory read, gradient flow, learning, fit/resume."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny_data import TinyBenchmark, pattern_split, tiny_context

from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.metanet import (
    MetaNet,
    MetaNetConfig,
    MetaNetModel,
    contrastive_loss,
    preprocess_gradients,
    read_memory,
)

SIZE = 12  # 12 -> 6 -> 3 -> 2 -> 1 -> 1 through five poolings
TINY = MetaNetConfig(
    filters=8, hidden=8, max_ways=5, meta_hidden=6, train_queries=2, max_episodes=2, checkpoint_every=1
)


def task(ways: int, shots: int, queries: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(ways, 1, SIZE, SIZE, generator=generator)

    def draw(per_class: int):
        labels = torch.arange(ways).repeat_interleave(per_class)
        noise = 0.3 * torch.randn(len(labels), 1, SIZE, SIZE, generator=generator)
        return prototypes[labels] + noise, labels

    return draw(shots), draw(queries)


def tiny_model(config: MetaNetConfig = TINY) -> MetaNetModel:
    torch.manual_seed(0)
    return MetaNetModel(channels=1, image_size=SIZE, config=config)


def test_preprocess_gradients_encodes_scale_and_sign():
    encoded = preprocess_gradients(torch.tensor([-0.5, 1e-6, 0.0]), k=7.0)
    assert encoded.shape == (3, 2)
    assert torch.allclose(encoded[0], torch.tensor([torch.log(torch.tensor(0.5)) / 7, -1.0]))
    assert encoded[1, 0] == -1.0 and encoded[1, 1] == pytest.approx(1e-6 * torch.e**7)
    assert torch.equal(encoded[2], torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize("ways,shots", [(3, 1), (5, 1), (4, 2)])
def test_logit_shapes(ways, shots):
    (xs, ys), (xq, _) = task(ways, shots, queries=3)
    logits = tiny_model()(xs, ys, xq, ways)
    assert logits.shape == (3 * ways, ways)
    assert torch.isfinite(logits).all()


def test_twenty_way_task():
    model = tiny_model(replace(TINY, max_ways=20))
    (xs, ys), (xq, _) = task(20, 1, queries=1)
    assert model(xs, ys, xq, 20).shape == (20, 20)


@pytest.mark.parametrize("augmented_layers", [2, 7])
def test_any_number_of_augmented_layers(augmented_layers):
    (xs, ys), (xq, _) = task(3, 1, queries=1)
    model = tiny_model(replace(TINY, augmented_layers=augmented_layers))
    assert model(xs, ys, xq, 3).shape == (3, 3)
    with pytest.raises(ValueError, match="augmented_layers"):
        tiny_model(replace(TINY, augmented_layers=8))


def test_more_ways_than_outputs_is_rejected():
    (xs, ys), (xq, _) = task(5, 1, queries=1)
    with pytest.raises(ValueError, match="max_ways"):
        tiny_model(replace(TINY, max_ways=4))(xs, ys, xq, 5)


def test_memory_read_is_a_convex_combination_of_stored_fast_weights():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(6, 4, generator=generator), torch.randn(6, 30, generator=generator)
    read, attention = read_memory(torch.randn(3, 4, generator=generator), keys, values)
    assert attention.shape == (3, 6) and read.shape == (3, 30)
    assert (attention >= 0).all()
    assert torch.allclose(attention.sum(1), torch.ones(3))
    assert torch.allclose(read, attention @ values)
    assert (read >= values.min(0).values - 1e-6).all() and (read <= values.max(0).values + 1e-6).all()


def test_memory_read_favours_the_most_similar_key():
    keys = torch.eye(3)
    _, attention = read_memory(torch.tensor([[0.0, 2.0, 0.0]]), keys, torch.randn(3, 5))
    assert attention.argmax() == 1


def test_a_larger_attention_scale_sharpens_the_read_towards_the_nearest_key():
    # Non-negative keys (ReLU outputs) that are nearly parallel, as u's keys are early in training.
    keys = torch.tensor([[1.0, 0.2, 0.1], [0.2, 1.0, 0.1], [0.1, 0.2, 1.0]]) + 1.0
    query, values = keys[1:2], torch.randn(3, 5)
    _, flat = read_memory(query, keys, values)
    _, sharp = read_memory(query, keys, values, scale=10.0)
    assert flat.argmax() == sharp.argmax() == 1
    assert flat.max() < 0.4 and sharp.max() > 0.55
    assert torch.allclose(sharp.sum(1), torch.ones(1))


def test_the_attention_scale_is_the_papers_1_or_learned_from_its_start():
    xs, ys, xq = torch.randn(3, 1, SIZE, SIZE), torch.arange(3), torch.randn(6, 1, SIZE, SIZE)
    paper = tiny_model(TINY)
    assert paper.attention_scale() == 1.0 and paper.log_attention_scale is None
    learned = tiny_model(replace(TINY, attention_scale=10.0))
    assert learned.attention_scale().item() == pytest.approx(10.0, rel=1e-6)
    # The other parameters start where the paper's model starts.
    learned_parameters = dict(learned.named_parameters())
    for name, p in paper.named_parameters():
        assert torch.equal(p, learned_parameters[name]), name
    F.cross_entropy(learned(xs, ys, xq, 3), torch.arange(3).repeat(2)).backward()
    assert learned.log_attention_scale.grad is not None and learned.log_attention_scale.grad != 0


def test_contrastive_loss_pulls_same_pairs_and_pushes_others():
    embeddings = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 0.0]])
    pairs = torch.tensor([[0, 1], [0, 2]])
    assert contrastive_loss(embeddings, pairs, torch.tensor([True, False])) < 0.01
    assert contrastive_loss(embeddings, pairs, torch.tensor([False, True])) > 1.0


@pytest.mark.parametrize("shots", [1, 2])
def test_gradients_reach_b_u_m_and_d(shots):
    model = tiny_model()
    (xs, ys), (xq, yq) = task(3, shots, queries=2)
    F.cross_entropy(model(xs, ys, xq, 3), yq).backward()
    # u's classifier head only produces meta information (a detached input), as in the paper.
    untrained = {"representation.layers.classifier.weight"}
    for group in ("base", "representation", "example_meta", "task_meta"):
        for name, parameter in getattr(model, group).named_parameters(prefix=group):
            if name in untrained:
                assert parameter.grad is None
                continue
            assert parameter.grad is not None, name
            assert parameter.grad.abs().sum() > 0, name


def test_a_few_updates_reduce_the_loss_on_a_tiny_task():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    (xs, ys), (xq, yq) = task(3, 1, queries=3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(xs, ys, xq, 3), yq)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def metanet_context(tmp_path, ways=3, shots=1) -> BenchContext:
    dataset = pattern_split(6, 4, SIZE, seed=1, noise=0.3)
    benchmark = TinyBenchmark(train=dataset, val=dataset, test=dataset, image_size=SIZE)
    return tiny_context(benchmark, tmp_path, ways=ways, shots=shots, queries=2)


def test_fit_checkpoints_resumes_and_predicts(tmp_path):
    context = metanet_context(tmp_path)
    method = MetaNet(TINY)
    method.fit(context)
    assert (tmp_path / "checkpoint.pt").exists() and len(method.losses) == TINY.max_episodes

    reloaded = MetaNet(TINY)
    reloaded.fit(context)  # a finished fit is reused: same weights, no further episodes
    assert reloaded.losses == method.losses
    (xs, ys), (xq, _) = task(3, 1, queries=2)
    logits = reloaded.predict(xs, ys, xq, ways=3)
    assert logits.shape == (6, 3)
    assert torch.allclose(logits, method.predict(xs, ys, xq, ways=3))
    with torch.enable_grad():
        assert torch.allclose(logits, method.model(xs, ys, xq, 3), atol=1e-6)


def test_fit_rejects_more_ways_than_outputs(tmp_path):
    with pytest.raises(ValueError, match="max_ways"):
        MetaNet(replace(TINY, max_ways=2)).fit(metanet_context(tmp_path, ways=3))


def test_quick_profile_keeps_the_papers_architecture_and_optimiser():
    quick, paper = MetaNetConfig.quick(), MetaNetConfig()
    assert (quick.conv_layers, quick.hidden, quick.meta_hidden) == (5, 64, 20)
    assert (paper.conv_layers, paper.hidden, paper.meta_hidden) == (5, 64, 20)
    # The departures its docstring gives: narrower conv layers, fewer augmented layers.
    assert (paper.filters, quick.filters) == (64, 32)
    assert (paper.augmented_layers, quick.augmented_layers) == (3, 2)
    # And a learned read scale, a decaying rate and a tail mean (the paper: softmax(cos), a
    # constant rate, the last iterate).
    assert (paper.attention_scale, paper.budget_decay, paper.average_last) == (None, 0.0, 0.0)
    assert (quick.attention_scale, quick.budget_decay, quick.average_last) == (30.0, 0.3, 0.25)
    for config in (quick, paper):
        assert (config.lr, config.gradient_clip, config.gradient_k) == (1e-3, 10.0, 7.0)
