import pytest
import torch
import torchvision
from torch import nn

from mtl_plugin import SSAdapter, feature_width, new_head
from mtl_plugin.backbones import conv4


def test_the_width_is_read_or_measured():
    assert feature_width(SSAdapter(conv4(in_channels=1, hidden=8, image_size=28))) == 8
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.train()
    assert feature_width(resnet) == 512 and resnet.training      # measured, mode restored
    mlp = nn.Sequential(nn.Linear(20, 7), nn.ReLU())
    assert feature_width(mlp) == 7
    assert feature_width(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), sample=torch.zeros(1, 3, 2, 2)) == 3


def test_a_new_head_starts_at_zero_and_learns_the_class_means():
    features = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    head = new_head(nn.Sequential(nn.Linear(2, 2)), ways=2)
    logits = head(features)
    assert torch.equal(logits, torch.zeros(2, 2))                # uniform first predictions
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
