"""The baseline methods of ``mtl bench`` on tiny in-memory data (16 px, a few classes)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import learn2learn as l2l
import pytest
import torch
from tiny_data import TinyBenchmark, pattern_split, tiny_context
from torch import nn

from mtl_plugin.backbones import conv4
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.cosine_finetune import (
    CosineClassifier,
    CosineFinetune,
    CosineFinetuneConfig,
    mean_entropy,
    transductive_loss,
)
from mtl_plugin.bench.methods.finetune import Finetune, FinetuneConfig
from mtl_plugin.bench.methods.maml import MAML, MAMLConfig
from mtl_plugin.bench.methods.protonet import (
    ProtoNet,
    ProtoNetConfig,
    ProtoNetConv4,
    ProtoNetConv4Config,
)
from mtl_plugin.prototypes import class_prototypes, prototype_logits
from mtl_plugin.tasks import build_taskset, split_support_query

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 3, 16


def class_structured_split(classes: int, per_class: int, seed: int) -> l2l.data.MetaDataset:
    """Learnable in a few dozen episodes."""
    return pattern_split(classes, per_class, SIZE, seed, noise=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def benchmark() -> TinyBenchmark:
    return TinyBenchmark(
        train=class_structured_split(8, SHOTS + 6, seed=0),
        val=class_structured_split(4, SHOTS + QUERIES, seed=1),
        test=class_structured_split(4, SHOTS + QUERIES, seed=2),
    )


def tiny_backbone() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return conv4(in_channels=1, hidden=8, image_size=SIZE)


def make_context(benchmark: TinyBenchmark, work_dir: Path, seed: int = 0) -> BenchContext:
    return tiny_context(
        benchmark,
        work_dir,
        ways=WAYS,
        shots=SHOTS,
        queries=QUERIES,
        seed=seed,
        pretrained_backbone=tiny_backbone,
        backbone_name="conv4-tiny",
    )


def first_test_task(benchmark: TinyBenchmark, index: int = 0):
    x, y = build_taskset(benchmark.test, WAYS, SHOTS, QUERIES, num_tasks=4, seed=0)[index]
    return split_support_query(x, y, SHOTS)


TINY_PROTONET = ProtoNetConv4Config(hidden=8, train_ways=WAYS, train_queries=3, max_episodes=40, checkpoint_every=15)
TINY_MAML = replace(
    MAMLConfig.omniglot(), hidden=8, meta_batch=2, meta_lr=3e-3, max_episodes=40, checkpoint_every=15, train_queries=3
)
TINY_FINETUNE = FinetuneConfig(steps=5)
TINY_COSINE = CosineFinetuneConfig(steps=5, head_lr=0.01, backbone_lr=0.001)

METHODS = {
    "protonet": lambda: ProtoNet(ProtoNetConfig()),
    "protonet-conv4": lambda: ProtoNetConv4(replace(TINY_PROTONET, max_episodes=3)),
    "maml": lambda: MAML(replace(TINY_MAML, max_episodes=3)),
    "finetune": lambda: Finetune(TINY_FINETUNE),
    "finetune-frozen": lambda: Finetune(FinetuneConfig.quick()),
    "cosine-finetune": lambda: CosineFinetune(TINY_COSINE),
    "cosine-finetune-frozen": lambda: CosineFinetune(CosineFinetuneConfig.quick()),
}


@pytest.mark.parametrize("key", sorted(METHODS))
def test_fit_then_predict_gives_one_logit_per_query_and_way(key, benchmark, tmp_path):
    method = METHODS[key]()
    method.fit(make_context(benchmark, tmp_path))
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    logits = method.predict(support_x, support_y, query_x, WAYS)
    assert logits.shape == (WAYS * QUERIES, WAYS)
    assert torch.isfinite(logits).all()
    assert method.name == key.removesuffix("-frozen")


@pytest.mark.parametrize("key", ["finetune", "cosine-finetune", "protonet"])
def test_pretrained_backbone_is_left_untouched(key, benchmark, tmp_path):
    method = METHODS[key]()
    method.fit(make_context(benchmark, tmp_path))
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    method.predict(support_x, support_y, query_x, WAYS)
    after = method.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method_class,config", [(ProtoNetConv4, TINY_PROTONET), (MAML, TINY_MAML)])
def test_episodic_training_reduces_the_loss(method_class, config, benchmark, tmp_path):
    method = method_class(config)
    method.fit(make_context(benchmark, tmp_path))
    assert len(method.losses) == config.max_episodes
    first, last = method.losses[:10], method.losses[-10:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first)


@pytest.mark.parametrize("method_class,config", [(ProtoNetConv4, TINY_PROTONET), (MAML, TINY_MAML)])
def test_episodic_predictions_are_deterministic_for_a_seed(method_class, config, benchmark, tmp_path):
    config = replace(config, max_episodes=5)
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    logits = []
    for run in ("a", "b"):
        method = method_class(config)
        method.fit(make_context(benchmark, tmp_path / run, seed=3))
        logits.append(method.predict(support_x, support_y, query_x, WAYS))
    assert torch.equal(logits[0], logits[1])
    other = method_class(config)
    other.fit(make_context(benchmark, tmp_path / "other-seed", seed=4))
    assert not torch.equal(logits[0], other.predict(support_x, support_y, query_x, WAYS))


@pytest.mark.parametrize("key", ["finetune", "cosine-finetune", "finetune-frozen"])
def test_finetuning_predictions_are_deterministic(key, benchmark, tmp_path):
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    logits = []
    for _ in range(2):
        method = METHODS[key]()
        method.fit(make_context(benchmark, tmp_path))
        logits.append(method.predict(support_x, support_y, query_x, WAYS))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("method_class,config", [(ProtoNetConv4, TINY_PROTONET), (MAML, TINY_MAML)])
def test_a_finished_fit_is_reused_and_an_interrupted_one_resumes(method_class, config, benchmark, tmp_path):
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    config = replace(config, max_episodes=6, checkpoint_every=2)
    first = method_class(config)
    first.fit(make_context(benchmark, tmp_path))
    again = method_class(config)
    again.fit(make_context(benchmark, tmp_path))
    assert again.losses == first.losses
    assert torch.equal(
        first.predict(support_x, support_y, query_x, WAYS), again.predict(support_x, support_y, query_x, WAYS)
    )

    # A run killed after its checkpoint at episode 4 resumes there and ends exactly where
    # the uninterrupted run ended: same losses, same weights.
    resumed_dir = tmp_path / "resumed"
    method_class(replace(config, max_episodes=4)).fit(make_context(benchmark, resumed_dir))
    checkpoint = torch.load(resumed_dir / "checkpoint.pt", weights_only=True)
    checkpoint["finished"] = False
    checkpoint["fingerprint"]["config"]["max_episodes"] = 6
    torch.save(checkpoint, resumed_dir / "checkpoint.pt")
    resumed = method_class(config)
    resumed.fit(make_context(benchmark, resumed_dir))
    assert resumed.losses == first.losses
    assert torch.equal(
        resumed.predict(support_x, support_y, query_x, WAYS), first.predict(support_x, support_y, query_x, WAYS)
    )


def test_a_checkpoint_of_another_configuration_is_refused(benchmark, tmp_path):
    ProtoNetConv4(replace(TINY_PROTONET, max_episodes=2)).fit(make_context(benchmark, tmp_path))
    with pytest.raises(ValueError, match="different run"):
        ProtoNetConv4(replace(TINY_PROTONET, max_episodes=2, lr=0.5)).fit(make_context(benchmark, tmp_path))


def test_protonet_assigns_queries_to_the_nearest_class_mean():
    features = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    prototypes = class_prototypes(features, torch.tensor([0, 0, 1, 1]), ways=2)
    assert torch.equal(prototypes, torch.tensor([[0.0, 1.0], [4.0, 1.0]]))
    logits = prototype_logits(torch.tensor([[1.0, 1.0], [3.0, 0.0]]), prototypes)
    assert torch.allclose(logits, torch.tensor([[-1.0, -9.0], [-10.0, -2.0]]))


def test_class_prototypes_names_a_missing_class():
    with pytest.raises(ValueError, match="cover every class"):
        class_prototypes(torch.zeros(2, 3), torch.tensor([0, 0]), ways=2)


def test_cosine_classifier_starts_at_normalised_class_means_with_zero_bias():
    features = torch.tensor([[3.0, 0.0], [1.0, 0.0], [6.0, 4.0], [0.0, 4.0]])
    head = CosineClassifier.from_support(features, torch.tensor([0, 0, 1, 1]), ways=2, scale=10.0)
    # Class means (2, 0) and (3, 4), normalised.
    assert torch.allclose(head.weight, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    assert torch.equal(head.bias, torch.zeros(2))
    logits = head(torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(logits, torch.tensor([[10.0, 6.0]]))


def test_transductive_loss_is_support_cross_entropy_plus_mean_query_entropy():
    support_logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    query_logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # uniform: entropy log 2
    loss = transductive_loss(support_logits, torch.tensor([0]), query_logits, entropy_weight=0.5)
    assert torch.allclose(loss, torch.tensor(-math.log(0.75) + 0.5 * math.log(2.0)))
    assert torch.allclose(mean_entropy(torch.zeros(3, 5)), torch.tensor(math.log(5.0)))


def test_cosine_finetune_uses_the_queries_and_finetune_does_not(benchmark, tmp_path):
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    shifted_queries = torch.cat([query_x[:1], query_x[1:] + 3.0])
    for key, depends_on_other_queries in [("cosine-finetune-frozen", True), ("finetune-frozen", False)]:
        method = METHODS[key]()
        method.fit(make_context(benchmark, tmp_path))
        first_query = method.predict(support_x, support_y, query_x, WAYS)[0]
        first_query_again = method.predict(support_x, support_y, shifted_queries, WAYS)[0]
        assert torch.allclose(first_query, first_query_again) is not depends_on_other_queries


def test_maml_refuses_another_number_of_ways(benchmark, tmp_path):
    method = MAML(replace(TINY_MAML, max_episodes=1))
    method.fit(make_context(benchmark, tmp_path))
    (support_x, support_y), (query_x, _) = first_test_task(benchmark)
    with pytest.raises(ValueError, match="ways=2"):
        method.predict(support_x, support_y, query_x, ways=2)
