import pytest
import torch

from mtl_plugin import backbones
from mtl_plugin.backbones import (
    build_backbone,
    check_backbone,
    conv4,
    list_backbones,
    register_backbone,
    small_input_resnet,
    torchvision_backbone,
)
from mtl_plugin.errors import DataError, UsageError


def test_builders_take_keywords_only():
    with pytest.raises(TypeError):
        conv4(1, 8)
    with pytest.raises(TypeError):
        build_backbone("conv4", 1)
    assert conv4(in_channels=1, hidden=8, image_size=16).feature_dim == 8


def test_a_registered_builder_is_built_and_checked_by_name(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))

    @register_backbone("tiny", min_image_size=16)
    def tiny(*, in_channels=3, num_classes=0, weights=None, image_size=84):
        return conv4(in_channels=in_channels, hidden=4, num_classes=num_classes, image_size=image_size, weights=weights)

    assert "tiny" in list_backbones()
    net = build_backbone("tiny", in_channels=1, image_size=32)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, net.feature_dim) == (2, 16)
    with pytest.raises(UsageError, match="too small for tiny"):
        check_backbone("tiny", image_size=8)
    with pytest.raises(UsageError, match="registered already"):
        register_backbone("tiny")(tiny)


def test_weights_are_loaded_and_weights_of_another_shape_are_refused():
    source = build_backbone("conv4", in_channels=1, image_size=16)
    copy = build_backbone("conv4", in_channels=1, image_size=16, weights=source.state_dict())
    x = torch.randn(3, 1, 16, 16)
    source.eval(), copy.eval()
    assert torch.equal(source(x), copy(x))
    with pytest.raises(DataError, match="other shapes"):
        build_backbone("conv4", in_channels=3, image_size=16, weights=conv4(in_channels=1).state_dict())


def test_small_input_refuses_to_drop_a_pretrained_stem():
    imagenet_shaped = torchvision_backbone("resnet18", num_classes=1000).state_dict()
    with pytest.raises(UsageError, match="stem would be dropped"):
        small_input_resnet("resnet18", weights=imagenet_shaped)
    with pytest.raises(UsageError, match="stem would be dropped"):
        torchvision_backbone("resnet18", in_channels=1, weights=imagenet_shaped)
    # Weights saved from the small-input model itself load.
    small = torchvision_backbone("resnet18", small_input=True, num_classes=1000)
    rebuilt = small_input_resnet("resnet18", weights=small.state_dict())
    assert torch.equal(rebuilt.conv1.weight, small.conv1.weight)


@pytest.mark.parametrize(
    "build", [lambda: backbones.conv4(in_channels=1, image_size=28), lambda: backbones.resnet12_half(in_channels=1)]
)
def test_images_follow_the_weights_memory_format(build):
    """Built channels-last, a backbone runs its activations so; converted back, it runs NCHW as torch does."""

    def run(model: torch.nn.Module) -> tuple[set[bool], torch.Tensor]:
        contiguous = []
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
        hooks = [c.register_forward_pre_hook(lambda _, args: contiguous.append(args[0].is_contiguous())) for c in convs]
        output = model(images)
        for hook in hooks:
            hook.remove()
        return set(contiguous), output

    torch.manual_seed(0)
    model, images = build().eval(), torch.randn(2, 1, 28, 28)
    built, built_output = run(model)
    nchw, nchw_output = run(model.to(memory_format=torch.contiguous_format))
    assert built == {False} and nchw == {True}
    # The same function: only the layout, and so the rounding, differs.
    torch.testing.assert_close(built_output, nchw_output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_conv4_pools_before_its_relu_with_the_textbook_order_s_outputs_and_gradients_to_the_bit(memory_format):
    """Conv4 runs each block as conv, BN, pool, ReLU: the same function and gradients as conv, BN, ReLU, pool."""
    torch.manual_seed(0)
    model = conv4(in_channels=1, hidden=8, image_size=28).to(memory_format=memory_format).train()
    blocks = [list(model.layers[i : i + 4]) for i in range(0, len(model.layers), 4)]
    assert all(isinstance(pool, torch.nn.MaxPool2d) and isinstance(relu, torch.nn.ReLU) for *_, pool, relu in blocks)
    textbook = torch.nn.Sequential(*[m for conv, bn, pool, relu in blocks for m in (conv, bn, relu, pool)])
    # Shifted down so that whole pooling windows are negative, where the two orders route gradients differently.
    images = torch.randn(6, 1, 28, 28) - 0.5

    def run(layers: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        output = layers(images.contiguous(memory_format=memory_format))
        output.flatten(1).pow(2).sum().backward()
        return output.detach(), [p.grad.clone() for p in model.parameters()]

    output, grads = run(model.layers)
    textbook_output, textbook_grads = run(textbook)
    assert torch.equal(output, textbook_output)
    assert all(torch.equal(a, b) for a, b in zip(grads, textbook_grads))
