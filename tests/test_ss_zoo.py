"""SS on every classification model of torchvision small enough for CI: exact, folded, trainable, small.

The walk takes every model of ``torchvision.models.list_models(module=torchvision.models)``
with at most ``MAX_PARAMS`` parameters (the count torchvision's weights state), plus the
smallest model of each family that has none under it (alexnet, vgg11, vit_b_16,
maxvit_t), so that a new family fails here whatever its size. Every model is checked
by ``benchmarks/ss_zoo.py``'s ``check_model``, which runs all 80, big ones included.
"""

import pytest
from benchmark_scripts import loaded_script

from mtl_plugin.ss.layers import SHARE_BOUND

# 30 M parameters: resnet50, swin_t and convnext_tiny are in; build, forward, fold and
# backward of one model stay within a few seconds on a CPU core.
MAX_PARAMS = 30_000_000


# Loaded once at collection: the parametrisation needs its list of models.
zoo = next(loaded_script("ss_zoo.py"))


def _walked() -> list[str]:
    names = zoo.models()
    sizes = {name: zoo.parameter_count(name) for name in names}
    smallest = {}
    for name in sorted(names, key=sizes.get):
        smallest.setdefault(zoo.family(name), name)
    return [name for name in names if sizes[name] <= MAX_PARAMS or smallest[zoo.family(name)] == name]


WALKED = _walked()


def test_the_walk_covers_every_family_and_the_transformers():
    assert {"vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "resnet50", "efficientnet_b0"} <= set(WALKED)
    assert len(WALKED) > 40


@pytest.mark.parametrize("name", WALKED)
def test_ss_on_a_torchvision_model(name, one_thread):
    result = zoo.check_model(name)
    # Φ1 = 1 and Φ2 = 0 swap in W * 1 and b + 0: the very same numbers.
    assert result["init_error"] <= 1e-6
    # Folding computes W ⊙ Φ1 as the forward does; only the order of float sums may differ.
    assert result["fold_error"] <= 1e-5
    # Auxiliary classifiers (googlenet's aux1/aux2, inception_v3's AuxLogits) run in training mode only.
    assert all(layer.lower().startswith("aux") for layer in result["no_gradient"]), result["no_gradient"]
    assert result["share"] <= SHARE_BOUND and result["share_warnings"] == 0
