"""The linear-probe row (RFS-simple): the logistic-regression fit on its own, then the method."""

from __future__ import annotations

import click
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

# The tiny benchmark, backbone and context of the other pretrained-backbone rows.
from test_methods_baselines import QUERIES, WAYS, benchmark, make_context  # noqa: F401  (benchmark: fixture)

from mtl_plugin.bench.methods import METHODS, build_method
from mtl_plugin.bench.methods.linear_probe import (
    LinearProbe,
    LinearProbeConfig,
    fit_logistic_regression,
    logistic_regression_objective,
)
from mtl_plugin.bench.methods.protonet import ProtoNet
from mtl_plugin.bench.published import published_accuracy
from mtl_plugin.bench.runner import SUITES
from mtl_plugin.cli import bench as bench_cli
from mtl_plugin.cli import main
from mtl_plugin.evaluation import EvaluationConfig, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def separable(per_class: int, seed: int, classes: int = 3, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Points near orthogonal class centres: linearly separable with a wide margin."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = 3.0 * torch.eye(classes, dim, dtype=torch.float64)
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64), labels


def objective_gradient_norm(weight, bias, features, labels, C) -> float:
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    logistic_regression_objective(weight, bias, features, labels, C).backward()
    return torch.cat([weight.grad.flatten(), bias.grad]).norm().item()


def support_cross_entropy(features, labels, C) -> float:
    weight, bias = fit_logistic_regression(features, labels, 3, C=C, tolerance=1e-9)
    return F.cross_entropy(features @ weight.T + bias, labels).item()


# The fit --------------------------------------------------------------------------------------


def test_separable_support_and_queries_are_classified_correctly():
    support, support_y = separable(5, seed=0)
    query, query_y = separable(20, seed=1)
    weight, bias = fit_logistic_regression(support, support_y, classes=3)
    assert weight.shape == (3, 8) and bias.shape == (3,) and weight.dtype == support.dtype
    assert torch.equal((support @ weight.T + bias).argmax(1), support_y)
    assert torch.equal((query @ weight.T + bias).argmax(1), query_y)


def test_the_fit_is_deterministic():
    support, support_y = separable(5, seed=0)
    first = fit_logistic_regression(support, support_y, classes=3)
    second = fit_logistic_regression(support.clone(), support_y.clone(), classes=3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_the_returned_weights_are_the_objectives_minimiser(C):
    support, support_y = separable(5, seed=2)
    weight, bias = fit_logistic_regression(support, support_y, classes=3, C=C, tolerance=1e-10)
    at_start = objective_gradient_norm(torch.zeros_like(weight), torch.zeros_like(bias), support, support_y, C)
    assert objective_gradient_norm(weight, bias, support, support_y, C) <= 1e-6 * at_start
    # RFS's default tolerance still lands close to the optimum.
    weight, bias = fit_logistic_regression(support, support_y, classes=3, C=C)
    assert objective_gradient_norm(weight, bias, support, support_y, C) <= 1e-2 * at_start


def test_a_larger_C_fits_the_support_at_least_as_tightly():
    # Overlapping classes, so that no C fits the support perfectly.
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(3).repeat_interleave(6)
    features = torch.randn(18, 8, generator=generator, dtype=torch.float64)
    losses = [support_cross_entropy(features, labels, C) for C in (0.01, 0.1, 1.0, 10.0, 100.0)]
    assert all(a >= b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0]


def test_float32_features_give_float32_weights_close_to_the_float64_fit():
    support, support_y = separable(5, seed=0)
    weight64, _ = fit_logistic_regression(support, support_y, classes=3)
    weight32, bias32 = fit_logistic_regression(support.float(), support_y, classes=3)
    assert weight32.dtype == bias32.dtype == torch.float32
    assert torch.allclose(weight32.double(), weight64, atol=1e-4)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(C=0.0), "C=0.0 must be a finite number > 0"),
        (dict(C=-1.0), "C=-1.0 must be a finite number > 0"),
        (dict(C=float("inf")), "C=inf must be a finite number > 0"),
        (dict(max_iter=0), "max_iter=0 must be an integer >= 1"),
        (dict(tolerance=-1e-4), "tolerance=-0.0001 must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_named(settings, message):
    support, support_y = separable(2, seed=0)
    with pytest.raises(ValueError, match=message):
        fit_logistic_regression(support, support_y, classes=3, **settings)
    with pytest.raises(ValueError, match=message):
        LinearProbeConfig(**settings)


def test_bad_inputs_are_named():
    support, support_y = separable(2, seed=0)
    with pytest.raises(ValueError, match="cover every class 0..3"):
        fit_logistic_regression(support, support_y, classes=4)
    with pytest.raises(ValueError, match="lie in 0..classes-1"):
        fit_logistic_regression(support, support_y, classes=2)
    with pytest.raises(ValueError, match="2-D"):
        fit_logistic_regression(support[0], support_y, classes=3)
    with pytest.raises(ValueError, match="one label per row"):
        fit_logistic_regression(support, support_y[:-1], classes=3)


# The method -----------------------------------------------------------------------------------


def test_registered_in_the_comparison_suite_after_protonet_with_rfs_figures():
    assert METHODS["linear-probe"] == (LinearProbe, LinearProbeConfig)
    rows = SUITES["comparison"]
    assert rows.index("linear-probe") == rows.index("protonet") + 1
    assert LinearProbe.uses_pretraining and not LinearProbe.transductive
    assert LinearProbeConfig.quick() == LinearProbeConfig() == LinearProbeConfig(C=1.0, max_iter=1000)
    assert isinstance(build_method("linear-probe", profile="quick"), LinearProbe)
    assert published_accuracy("mini-imagenet", "linear-probe", 5, 1).cell == "62.02 ± 0.63"
    assert published_accuracy("tiered-imagenet", "linear-probe", 5, 5).cell == "84.41"
    assert published_accuracy("cifarfs", "linear-probe", 5, 5).accuracy == 86.0
    assert published_accuracy("fc100", "linear-probe", 5, 1).source == "Tian et al. ECCV 2020 (RFS-simple)"


def test_mtl_bench_accepts_the_row(monkeypatch, tmp_path):
    seen = {}

    def fake_run(config, echo):
        seen["rows"] = config.rows
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(bench_cli, "run_bench", fake_run)
    result = CliRunner().invoke(
        main, ["bench", "--profile", "quick", "--methods", "linear-probe", "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert seen["rows"] == ("linear-probe",)


def test_fitted_on_a_bench_context_it_beats_chance_where_protonet_does(benchmark, tmp_path):
    method = LinearProbe()
    method.fit(make_context(benchmark, tmp_path))
    assert method.describe_backbone() == "conv4-tiny"
    protonet = ProtoNet()
    protonet.fit(make_context(benchmark, tmp_path))
    config = EvaluationConfig(ways=WAYS, shots=2, queries=QUERIES, tasks=8, seed=0)
    logits = []

    def recording(support_x, support_y, query_x, ways):
        logits.append(method.predict(support_x, support_y, query_x, ways))
        return logits[-1]

    probe = evaluate(recording, benchmark.test, config, progress=False)
    nearest_mean = evaluate(protonet.predict, benchmark.test, config, progress=False)
    chance = 100.0 / WAYS
    assert nearest_mean.mean > chance
    assert probe.mean > chance
    assert all(z.shape == (WAYS * QUERIES, WAYS) and torch.isfinite(z).all() for z in logits)


def test_predict_is_inductive_and_leaves_the_backbone_untouched(benchmark, tmp_path):
    method = LinearProbe()
    method.fit(make_context(benchmark, tmp_path))
    images = benchmark.test.dataset.images
    support_x, support_y = images[[0, 1, 5, 6, 10, 11]], torch.tensor([0, 0, 1, 1, 2, 2])
    query_x = images[[2, 7, 12]]
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    logits = method.predict(support_x, support_y, query_x, WAYS)
    others = method.predict(support_x, support_y, torch.cat([query_x[:1], query_x[1:] + 3.0]), WAYS)
    assert torch.allclose(logits[0], others[0])
    assert torch.equal(logits, method.predict(support_x, support_y, query_x, WAYS))
    assert all(torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())


def test_predict_before_fit_is_refused():
    with pytest.raises(RuntimeError, match="before fit"):
        LinearProbe().predict(torch.zeros(3, 1, 16, 16), torch.arange(3), torch.zeros(1, 1, 16, 16), 3)
