import learn2learn as l2l
import pytest
import torch
import torchvision
from torch import nn

from mtl_plugin import SSAdapter, SSHead, feature_width, new_head
from mtl_plugin.backbones import conv4


def test_the_width_is_read_or_measured():
    assert feature_width(SSAdapter(conv4(in_channels=1, hidden=8, image_size=28))) == 8
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.train()
    assert feature_width(resnet) == 512 and resnet.training  # measured, mode restored
    mlp = nn.Sequential(nn.Linear(20, 7), nn.ReLU())
    assert feature_width(mlp) == 7
    assert feature_width(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), sample=torch.zeros(1, 3, 2, 2)) == 3


def test_a_new_head_starts_at_zero_and_learns_the_class_means():
    features = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    head = new_head(nn.Sequential(nn.Linear(2, 2)), ways=2)
    logits = head(features)
    assert torch.equal(logits, torch.zeros(2, 2))  # uniform first predictions
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    head.weight.data -= head.weight.grad
    assert (head(features).argmax(1) == torch.tensor([0, 1])).all()


def test_what_has_no_width_says_how_to_give_one():
    with pytest.raises(ValueError, match="feature_dim"):
        feature_width(nn.ReLU())
    with pytest.raises(ValueError, match="flatten"):
        feature_width(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="ways=1"):
        new_head(nn.Linear(2, 2), ways=1)


def tiny_backbone():
    torch.manual_seed(0)
    return conv4(in_channels=1, hidden=8, image_size=28)


def test_maml_adapts_the_ss_head_alone_and_the_meta_gradient_reaches_phi():
    model = SSHead(tiny_backbone(), ways=3)
    maml = l2l.algorithms.MAML(model, lr=0.5)
    assert [name for name, _ in maml.named_parameters()] == ["module.head.weight", "module.head.bias"]
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    learner = maml.clone()
    phi = [p.clone() for p in model.ss_parameters()]
    learner.adapt(nn.functional.cross_entropy(learner(x[:3]), y[:3]))
    assert learner.features is model.features and not torch.equal(learner.head.weight, model.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(phi, model.ss_parameters()))  # Φ is not adapted
    nn.functional.cross_entropy(learner(x[3:]), y[3:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ss_parameters())
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.features.backbone.parameters())


def test_the_ss_head_moves_switches_mode_and_saves_phi_with_its_features():
    adapter = SSAdapter(tiny_backbone())
    model = SSHead(adapter, ways=3)
    assert model.features is adapter
    assert not model.eval().features.training and model.train().features.training
    assert next(model.to(torch.float64).ss_parameters()).dtype == torch.float64
    model.to(torch.float32)
    with torch.no_grad():
        for p in model.ss_parameters():
            p.add_(0.1)
        model.head.bias.add_(1.0)
    state = model.state_dict()
    assert {key.split(".")[0] for key in state} == {"head", "ss"}  # Φ, not the frozen backbone
    fresh = SSHead(tiny_backbone(), ways=3)
    fresh.load_state_dict(state)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    del state["ss.layers.0.scale"]
    with pytest.raises(RuntimeError, match="ss.layers.0.scale"):
        fresh.load_state_dict(state)
