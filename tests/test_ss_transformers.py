"""SS on the layers that hold a transformer's weights: nn.Linear and nn.MultiheadAttention.

Exact at initialisation and after ``fold()``, the definition checked against hand-built
weights (the packed and the separate q/k/v projections), and the meta-gradient through
learn2learn, higher and torch.func equal to the hand-written one, as for convs in test_ss.py.
"""

import copy
import warnings

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
from test_ss import _hand_written_reference, _higher, _learn2learn, _perturb, _task, _torch_func
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.models import VisionTransformer

from mtl_plugin import SSAdapter
from mtl_plugin.backbones import build_backbone
from mtl_plugin.ss import SSShareWarning, last_block


def tiny_vit(image_size: int = 16) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16)
    vit.heads = nn.Identity()  # the few-shot head replaces the classifier
    return vit


class CrossAttention(nn.Module):
    """Attention whose keys and values are narrower than its queries: q, k and v projections apart."""

    def __init__(self, bias: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, bias=bias, kdim=12, vdim=10, batch_first=True)

    def forward(self, query, key, value):
        return self.attention(query, key, value, need_weights=False)[0]


def _inputs(generator):
    return (
        torch.randn(2, 3, 16, generator=generator),
        torch.randn(2, 4, 12, generator=generator),
        torch.randn(2, 4, 10, generator=generator),
    )


def test_a_vit_gets_ss_on_its_patch_conv_attention_and_mlps():
    vit = tiny_vit().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vit(x)
    adapter = SSAdapter(vit).eval()
    kinds = list(adapter.parameter_report()["kernel"].iloc[:-1])
    # Per encoder layer: the attention's in-projection, its out_proj, the MLP's two linears.
    assert kinds == ["8x8"] + ["attention", "linear", "linear", "linear"] * 2
    block = "encoder.layers.encoder_layer_0"
    shapes = {name: tuple(p.shape) for name, p in adapter.named_ss_parameters()}
    assert shapes[f"{block}.self_attention.scale"] == (24, 1) and shapes[f"{block}.self_attention.shift"] == (24,)
    assert shapes[f"{block}.self_attention.out_proj.scale"] == (8, 1)
    assert shapes[f"{block}.mlp.0.scale"] == (16, 1) and shapes["conv_proj.scale"] == (8, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(adapter(x), reference)
        _perturb(adapter, torch.Generator().manual_seed(1))
        adapted = adapter(x)
        assert not torch.allclose(adapted, reference, atol=1e-3)
        folded = adapter.fold().eval()
        assert type(folded) is VisionTransformer
        assert torch.allclose(folded(x), adapted, atol=1e-6 * adapted.abs().max(), rtol=0)
    # The same in training mode, where attention leaves its fused inference path.
    adapter.train()
    folded.train()
    torch.manual_seed(2)
    assert torch.allclose(folded(x), adapter(x), atol=1e-6 * adapted.abs().max(), rtol=0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_separate_qkv_projections_follow_the_definition(bias):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = CrossAttention(bias).eval()
    inputs = _inputs(generator)
    with torch.no_grad():
        reference = model(*inputs)
    adapter = SSAdapter(copy.deepcopy(model))
    assert adapter.conv_names == ["attention", "attention.out_proj"]
    with torch.no_grad():
        # Equal up to float rounding: BLAS may sum a freshly allocated W * 1 in another order.
        assert torch.allclose(adapter(*inputs), reference, atol=1e-6 * reference.abs().max(), rtol=0)
    _perturb(adapter, generator)
    scale, shift = adapter.scales[0], adapter.shifts[0]
    # By hand: rows 0-15 of Φ1 scale q, 16-31 k, 32-47 v; Φ2 shifts the packed bias (zero without one).
    expected = copy.deepcopy(model)
    attention = expected.attention
    with torch.no_grad():
        attention.q_proj_weight.mul_(scale[:16])
        attention.k_proj_weight.mul_(scale[16:32])
        attention.v_proj_weight.mul_(scale[32:])
        attention.in_proj_bias = nn.Parameter(shift.detach().clone() if not bias else attention.in_proj_bias + shift)
        attention.out_proj.weight.mul_(adapter.scales[1])
        attention.out_proj.bias = nn.Parameter(
            adapter.shifts[1].detach().clone() if not bias else attention.out_proj.bias + adapter.shifts[1]
        )
        tolerance = 1e-6 * reference.abs().max()
        assert torch.allclose(adapter(*inputs), expected(*inputs), atol=tolerance, rtol=0)
        folded = adapter.fold()
        assert torch.allclose(folded(*inputs), adapter(*inputs), atol=tolerance, rtol=0)
    # fold() gives a bias-free attention the bias that Φ2 needs, as it does a bias-free conv.
    assert folded.attention.in_proj_bias is not None and folded.attention.out_proj.bias is not None
    out = adapter(*inputs)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.ss_parameters())


@pytest.mark.parametrize("route", [_learn2learn, _higher, _torch_func], ids=["learn2learn", "higher", "torch.func"])
def test_meta_gradient_through_a_vit_matches_hand_written_reference(route):
    adapter = SSAdapter(tiny_vit())
    _perturb(adapter, torch.Generator().manual_seed(5))
    head = nn.Linear(8, 3)
    task = _task()
    reference = _hand_written_reference(adapter, head, *task)
    got = route(adapter, head, *task)
    assert all(g.abs().sum() > 0 for g in reference)
    for expected, actual in zip(reference, got):
        assert torch.allclose(actual, expected, atol=1e-6 * expected.abs().max(), rtol=1e-4)


def test_learn2learn_clones_a_transformer_adapter():
    """MAML on Φ itself: the clone's adapted Φ gives a second-order gradient to the original.

    The second order differentiates attention twice, which PyTorch's fused CPU attention
    kernels do not implement: the math kernel does.
    """
    adapter = SSAdapter(tiny_vit())
    head = nn.Linear(8, 3)
    support, ys, query, yq = _task()
    # allow_nograd: the frozen backbone's weights are part of the cloned module.
    maml = l2l.algorithms.MAML(nn.ModuleDict({"encoder": adapter, "head": head}), lr=0.1, allow_nograd=True)
    learner = maml.clone()
    with sdpa_kernel(SDPBackend.MATH):
        learner.adapt(F.cross_entropy(learner.module["head"](learner.module["encoder"](support)), ys))
        cloned = list(learner.module["encoder"].ss_parameters())
        assert all(c is not p for c, p in zip(cloned, adapter.ss_parameters()))
        F.cross_entropy(learner.module["head"](learner.module["encoder"](query)), yq).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.ss_parameters())
    assert not any(p.requires_grad for p in adapter.backbone.parameters())


def test_no_share_warning_on_a_transformer():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SSShareWarning)
        report = SSAdapter(tiny_vit()).parameter_report()
    assert 0 < report["share"].iloc[-1] < 0.25


def test_the_last_block_of_a_vit_is_its_last_encoder_layer():
    vit = tiny_vit()
    assert last_block(vit) == "encoder.layers.encoder_layer_1"
    # torchvision's classifier, replaced by build_backbone, is not a block.
    assert last_block(build_backbone("vit_b_16", image_size=224)) == "encoder.layers.encoder_layer_11"
    adapter = SSAdapter(vit, layers=[last_block(vit)])
    assert adapter.conv_names == [
        f"encoder.layers.encoder_layer_1.{name}"
        for name in ("self_attention", "self_attention.out_proj", "mlp.0", "mlp.3")
    ]
