import copy
import warnings

import higher
import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call

from mtl_plugin import SSAdapter
from mtl_plugin.backbones import build_backbone, conv4, resnet12, small_input_resnet
from mtl_plugin.bench.methods.mtl import MTLConfig
from mtl_plugin.cli.ss import ss_report
from mtl_plugin.ss import SSShareWarning, last_block

# Every torchvision classification model is walked in test_ss_zoo.py; these two have a
# classifier head (resnet18) and 1x1 convs with kernel-granularity rows (wide_resnet50_2).
TORCHVISION = ["resnet18", "wide_resnet50_2"]

OWN = {
    "resnet12": (lambda: resnet12(), 32),
    "conv4": (lambda: conv4(image_size=32), 32),
    "resnet18-small": (lambda: small_input_resnet("resnet18"), 28),
}


def _backbone(name):
    if name in OWN:
        build, size = OWN[name]
        return build(), size
    return torchvision.models.get_model(name, weights=None), 32


def _perturb(adapter, generator):
    with torch.no_grad():
        for parameter in adapter.ss_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("name", TORCHVISION + list(OWN))
def test_identity_at_init_fold_and_report(name):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    backbone, size = _backbone(name)
    backbone.eval()
    x = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        reference = backbone(x)
    weights_before = {k: v.clone() for k, v in backbone.state_dict().items()}

    adapter = SSAdapter(backbone).eval()
    with torch.no_grad():
        assert torch.allclose(adapter(x), reference, atol=1e-6, rtol=0)

    assert all(not p.requires_grad for p in backbone.parameters())
    # Never copied: the adapter's backbone is the very module it was given.
    assert adapter.backbone is backbone
    ss = list(adapter.ss_parameters())
    assert ss and all(p.requires_grad for p in ss)
    assert {id(p) for p in ss}.isdisjoint({id(p) for p in backbone.parameters()})

    _perturb(adapter, generator)
    folded = adapter.fold().eval()
    assert type(folded) is type(backbone)
    with torch.no_grad():
        assert torch.allclose(folded(x), adapter(x), atol=1e-5, rtol=1e-5)
    # Folding leaves the wrapped backbone as it was.
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, weights_before[key]), key

    report = adapter.parameter_report()
    layers = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]
    assert len(report) == len(layers) + 1
    assert report.iloc[-1]["layer"] == "total"
    assert report.iloc[-1]["ss"] == sum(p.numel() for p in ss)
    for _, row in report.iloc[:-1].iterrows():
        if row["kernel"] == "3x3":
            c = row["in_per_group"]
            assert row["scale_per"] == "kernel"
            assert row["ratio"] == pytest.approx((1 + c) / (1 + 9 * c))
        if row["kernel"] == "1x1":
            assert row["scale_per"] == "channel"
    # The share is of every backbone parameter, BatchNorm included; the layers' add up to the total.
    learned, size = sum(p.numel() for p in ss), sum(p.numel() for p in backbone.parameters())
    assert report.iloc[-1]["share"] == pytest.approx(learned / size)
    assert report["share"].iloc[:-1].sum() == pytest.approx(report["share"].iloc[-1])


def test_scale_shapes_for_every_conv_kind():
    net = nn.Sequential(
        nn.Conv2d(4, 8, 1),  # 1x1 with bias
        nn.Conv2d(8, 8, 3, groups=4, padding=1, bias=False),  # grouped
        nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False),  # depthwise
        nn.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2),  # strided, dilated
    )
    kernel = SSAdapter(copy.deepcopy(net), granularity="kernel")
    assert [tuple(s.shape) for s in kernel.scales] == [(8, 4, 1, 1), (8, 2, 1, 1), (8, 1, 1, 1), (6, 8, 1, 1)]
    assert [tuple(s.shape) for s in kernel.shifts] == [(8,), (8,), (8,), (6,)]
    channel = SSAdapter(copy.deepcopy(net), granularity="channel")
    assert [tuple(s.shape) for s in channel.scales] == [(8, 1, 1, 1)] * 3 + [(6, 1, 1, 1)]
    # "auto": per kernel where the kernel is spatial, per channel on the 1x1 conv.
    auto = SSAdapter(copy.deepcopy(net))
    assert [tuple(s.shape) for s in auto.scales] == [(8, 1, 1, 1), (8, 2, 1, 1), (8, 1, 1, 1), (6, 8, 1, 1)]
    assert list(auto.parameter_report()["scale_per"].iloc[:-1]) == ["channel", "kernel", "kernel", "kernel"]

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 9, generator=generator)
    for adapter in (kernel, channel, auto):
        _perturb(adapter, generator)
        # The definition, layer by layer: (W ⊙ Φ1) X + (b + Φ2).
        expected = x
        for conv, scale, shift in zip(net, adapter.scales, adapter.shifts):
            bias = shift if conv.bias is None else conv.bias + shift
            expected = F.conv2d(
                expected, conv.weight * scale, bias, conv.stride, conv.padding, conv.dilation, conv.groups
            )
        assert torch.allclose(adapter(x), expected, atol=1e-6)


def test_auto_granularity_leaves_the_papers_backbones_as_the_paper_counts():
    # Conv4 has 3x3 convs only: "auto" is the paper's scale per kernel.
    assert [s.shape for s in SSAdapter(conv4()).scales] == [
        s.shape for s in SSAdapter(conv4(), granularity="kernel").scales
    ]
    # ResNet-12's 1x1 shortcuts alone get one scale per channel under "auto"; the benchmark's
    # MTL rows keep the paper's "kernel", and with it the paper's count.
    auto, kernel = SSAdapter(resnet12()), SSAdapter(resnet12(), granularity="kernel")
    differ = [name for name, a, k in zip(auto.conv_names, auto.scales, kernel.scales) if a.shape != k.shape]
    assert differ == [f"layers.{i}.shortcut.0" for i in range(4)]
    assert kernel.parameter_report()["ss"].iloc[-1] == 1_620_992
    assert MTLConfig().granularity == "kernel"


def test_a_large_share_warns_once_naming_the_layers_and_the_option():
    net = nn.Sequential(nn.Conv2d(16, 64, 1), nn.ReLU(), nn.Conv2d(64, 16, 1))
    with pytest.warns(SSShareWarning) as caught:
        adapter = SSAdapter(copy.deepcopy(net), granularity="kernel")
    assert len(caught) == 1
    message = str(caught[0].message)
    share = adapter.parameter_report()["share"].iloc[-1]
    assert share > 0.25 and f"learns {share:.0%} of Sequential's 2,128 parameters" in message
    assert "most on 0, 2" in message and "granularity='auto'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", SSShareWarning)
        assert SSAdapter(net).parameter_report()["share"].iloc[-1] < 0.25
    # Where no granularity helps, the warning says to adapt fewer layers.
    with pytest.warns(SSShareWarning, match=r"layers=\.\.\. \(adapt fewer layers\)"):
        SSAdapter(nn.Linear(2, 2))


def test_batchnorm_modes():
    frozen = SSAdapter(resnet12(), bn="frozen")
    frozen.train()
    bns = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    frozen(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    assert all(not p.requires_grad for m in bns for p in m.parameters())

    trained = SSAdapter(resnet12(), bn="train").train()
    bns = [m for m in trained.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training for m in bns)
    trained.eval()
    assert all(not m.training for m in bns)


def test_ss_state_dict_round_trip_and_size(tmp_path):
    source = SSAdapter(small_input_resnet("resnet18"))
    _perturb(source, torch.Generator().manual_seed(2))
    state = source.ss_state_dict()
    assert all(key.endswith((".scale", ".shift")) for key in state)
    path = tmp_path / "ss.pt"
    torch.save(state, path)
    # A resnet18's SS file is a few MB, far from the backbone's ~45 MB.
    assert path.stat().st_size < 8 * 2**20

    target = SSAdapter(small_input_resnet("resnet18"))
    target.load_ss_state_dict(torch.load(path))
    for (k1, p1), (k2, p2) in zip(source.named_ss_parameters(), target.named_ss_parameters()):
        assert k1 == k2 and torch.equal(p1, p2)


def test_loading_another_architecture_names_the_layer():
    state = SSAdapter(small_input_resnet("resnet18")).ss_state_dict()
    with pytest.raises(ValueError, match="conv1"):
        SSAdapter(resnet12()).load_ss_state_dict(state)
    channel = SSAdapter(small_input_resnet("resnet18"), granularity="channel")
    with pytest.raises(ValueError, match=r"layer 'conv1' expects conv1.scale of shape \(64, 1, 1, 1\)"):
        channel.load_ss_state_dict(state)


def test_bad_input():
    with pytest.raises(ValueError, match="Sequential has no nn.Conv2d, nn.Linear or nn.MultiheadAttention"):
        SSAdapter(nn.Sequential(nn.ReLU()))
    adapter = SSAdapter(conv4())
    with pytest.raises(ValueError, match="already wrapped"):
        SSAdapter(adapter)
    with pytest.raises(ValueError, match="already wrapped"):
        SSAdapter(nn.Sequential(adapter))
    with pytest.raises(ValueError, match="auto, kernel, channel"):
        SSAdapter(conv4(), granularity="filter")
    with pytest.raises(ValueError, match="frozen, train"):
        SSAdapter(conv4(), bn="eval")


# --- SS on a subset of layers -----------------------------------------------------------


def test_last_block_is_named_as_the_user_names_modules():
    assert last_block(resnet12()) == "layers.3"
    assert last_block(conv4(image_size=32)) == "layers.12"
    assert last_block(torchvision.models.resnet18()) == "layer4.1"


@pytest.mark.parametrize(
    "build, layers, expected",
    [
        (
            torchvision.models.resnet18,
            ["layer4"],
            ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"],
        ),
        (resnet12, "layers.3", ["layers.3.conv1", "layers.3.conv2", "layers.3.conv3", "layers.3.shortcut.0"]),
        (resnet12, lambda name, conv: conv.kernel_size == (1, 1), [f"layers.{i}.shortcut.0" for i in range(4)]),
    ],
)
def test_ss_on_a_subset_of_layers(build, layers, expected):
    generator = torch.Generator().manual_seed(0)
    backbone = build().eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        reference = backbone(x)
    adapter = SSAdapter(backbone, layers=layers).eval()
    assert adapter.conv_names == expected
    assert [name for name, _ in adapter.named_ss_parameters()][::2] == [f"{n}.scale" for n in expected]
    with torch.no_grad():
        assert torch.allclose(adapter(x), reference, atol=1e-6, rtol=0)
    _perturb(adapter, generator)
    folded = adapter.fold().eval()
    with torch.no_grad():
        assert torch.allclose(folded(x), adapter(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(folded(x), reference, atol=1e-4)
    # Only the chosen convs are folded; every other weight is the backbone's own.
    folded_weights, own = folded.state_dict(), backbone.state_dict()
    changed = {k[: -len(".weight")] for k in own if k.endswith("weight") and not torch.equal(folded_weights[k], own[k])}
    assert changed == set(expected)

    report = adapter.parameter_report()
    layers = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(report) == len(layers) + 1
    body, total = report.iloc[:-1], report.iloc[-1]
    assert list(body.loc[body["adapted"], "layer"]) == expected
    assert (body.loc[~body["adapted"], "ss"] == 0).all()
    assert total["ss"] == sum(p.numel() for p in adapter.ss_parameters()) and not total["adapted"]


def test_layers_that_select_nothing_are_named():
    with pytest.raises(ValueError, match=r"no Conv2d, Linear or MultiheadAttention named 'layer4'.*layers\.3"):
        SSAdapter(resnet12(), layers=["layer4"])
    with pytest.raises(ValueError, match="selects no Conv2d, Linear or MultiheadAttention"):
        SSAdapter(resnet12(), layers=lambda name, conv: False)
    with pytest.raises(ValueError, match="selects no Conv2d, Linear or MultiheadAttention"):
        SSAdapter(resnet12(), layers=[])


# --- meta-gradients ---------------------------------------------------------------------
# One inner step on a linear head over SS features, then the query loss; its gradient with
# respect to Φ goes through both the adapted head (second order) and the features.

INNER_LR = 0.5


def _task():
    generator = torch.Generator().manual_seed(3)
    support = torch.randn(6, 3, 16, 16, generator=generator)
    query = torch.randn(9, 3, 16, 16, generator=generator)
    return support, torch.arange(6) % 3, query, torch.arange(9) % 3


def _setup():
    torch.manual_seed(4)
    adapter = SSAdapter(conv4(image_size=16, hidden=8))
    _perturb(adapter, torch.Generator().manual_seed(5))
    head = nn.Linear(adapter.backbone.feature_dim, 3)
    return adapter, head


def _hand_written_reference(adapter, head, support, ys, query, yq):
    """The inner step written out: d CE / d logits = softmax - onehot."""
    fs, fq = adapter(support), adapter(query)
    onehot = F.one_hot(ys, 3).float()
    residual = (fs @ head.weight.t() + head.bias).softmax(1) - onehot
    grad_w = residual.t() @ fs / len(ys)
    grad_b = residual.mean(0)
    weight, bias = head.weight - INNER_LR * grad_w, head.bias - INNER_LR * grad_b
    loss = F.cross_entropy(fq @ weight.t() + bias, yq)
    return torch.autograd.grad(loss, list(adapter.ss_parameters()))


def _learn2learn(adapter, head, support, ys, query, yq):
    maml = l2l.algorithms.MAML(head, lr=INNER_LR, first_order=False)  # the head only
    learner = maml.clone()
    learner.adapt(F.cross_entropy(learner(adapter(support)), ys))
    loss = F.cross_entropy(learner(adapter(query)), yq)
    return torch.autograd.grad(loss, list(adapter.ss_parameters()))


def _higher(adapter, head, support, ys, query, yq):
    optimiser = torch.optim.SGD(head.parameters(), lr=INNER_LR)
    with higher.innerloop_ctx(head, optimiser, copy_initial_weights=False) as (fhead, diffopt):
        diffopt.step(F.cross_entropy(fhead(adapter(support)), ys))
        loss = F.cross_entropy(fhead(adapter(query)), yq)
        return torch.autograd.grad(loss, list(adapter.ss_parameters()))


def _torch_func(adapter, head, support, ys, query, yq):
    params = dict(head.named_parameters())
    inner = F.cross_entropy(functional_call(head, params, (adapter(support),)), ys)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    adapted = {k: v - INNER_LR * g for (k, v), g in zip(params.items(), grads)}
    loss = F.cross_entropy(functional_call(head, adapted, (adapter(query),)), yq)
    return torch.autograd.grad(loss, list(adapter.ss_parameters()))


@pytest.mark.parametrize("route", [_learn2learn, _higher, _torch_func], ids=["learn2learn", "higher", "torch.func"])
def test_meta_gradient_matches_hand_written_reference(route):
    adapter, head = _setup()
    task = _task()
    reference = _hand_written_reference(adapter, head, *task)
    got = route(adapter, head, *task)
    assert all(g.abs().sum() > 0 for g in reference)
    for expected, actual in zip(reference, got):
        assert torch.allclose(actual, expected, atol=1e-6, rtol=1e-4)


def test_second_order_term_is_present():
    """A first-order inner step gives a different meta-gradient: the reference is really second order."""
    adapter, head = _setup()
    support, ys, query, yq = _task()
    second = _hand_written_reference(adapter, head, support, ys, query, yq)
    fs, fq = adapter(support), adapter(query)
    grads = torch.autograd.grad(F.cross_entropy(head(fs), ys), list(head.parameters()))
    weight, bias = (p - INNER_LR * g.detach() for p, g in zip(head.parameters(), grads))
    first = torch.autograd.grad(F.cross_entropy(fq @ weight.t() + bias, yq), list(adapter.ss_parameters()))
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(first, second))


def test_build_backbone_feature_dims():
    assert build_backbone("resnet12").feature_dim == 640
    assert build_backbone("conv4", in_channels=1, image_size=28).feature_dim == 64
    net = build_backbone("resnet18-small", in_channels=1)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, net.feature_dim)
    assert build_backbone("conv4", num_classes=5, image_size=28, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (
        2,
        5,
    )
    with pytest.raises(ValueError, match="unknown torchvision architecture"):
        build_backbone("resnet9000")


def test_a_fully_connected_model_gets_ss_per_neuron():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(5, 3, 2, 2)
    expected = mlp(x)
    adapter = SSAdapter(mlp)
    assert [tuple(p.shape) for p in adapter.ss_parameters()] == [(8, 1), (8,), (4, 1), (4,)]
    assert torch.allclose(adapter(x), expected)  # Φ1 = 1, Φ2 = 0: the model unchanged
    with torch.no_grad():
        for parameter in adapter.ss_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    adapted = adapter(x)
    assert torch.allclose(adapter.fold()(x), adapted, atol=1e-6)
    report = adapter.parameter_report()
    assert list(report["kernel"][:2]) == ["linear", "linear"] and report["ss"].iloc[-1] == 24
    adapted.sum().backward()
    assert all(p.grad is not None for p in adapter.ss_parameters())
    assert not any(p.requires_grad for p in mlp.parameters())
    # A CNN's classifier is a linear layer like any other: adapted per neuron until the user removes it.
    resnet = torchvision.models.resnet18(num_classes=10)
    assert SSAdapter(copy.deepcopy(resnet)).conv_names[-1] == "fc"
    resnet.fc = nn.Identity()
    assert all(isinstance(resnet.get_submodule(name), nn.Conv2d) for name in SSAdapter(resnet).conv_names)


def test_ss_report_command_prints_each_layers_scale_and_share():
    result = CliRunner().invoke(ss_report, ["resnet12", "--all-layers"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split()[-2:] == ["ratio", "share"]
    # The default is SSAdapter's "auto": ResNet-12's 1x1 shortcuts get a scale per channel.
    shortcut = next(row for row in rows if row.startswith("layers.0.shortcut.0"))
    assert shortcut.split()[1:2] == ["1x1"] and "channel" in shortcut.split()
