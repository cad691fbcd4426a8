"""SS on every classification model of torchvision: what it adapts and learns, and whether it is exact.

Per model, at ``SSAdapter``'s default granularity (``auto``) and at the paper's
``kernel``: the layers adapted by type, the SS parameters and their share of the
backbone. With ``--check`` it also runs :func:`check_model` (random weights): the
adapter's output against the backbone's at initialisation, the folded model's
against the adapter's with Φ perturbed, and a gradient on every layer's Φ.
``tests/test_ss_zoo.py`` runs the same check on every model up to a parameter
bound; this script covers the big ones too (several minutes on one CPU core).
Models are built with a 10-class head, so the shares are close to a headless
backbone's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ss_zoo.py [--check] [--max-params 1e9] [--markdown]
"""

from __future__ import annotations

import warnings

import click
import pandas as pd
import torch
import torchvision
from torch import nn

from mtl_plugin.ss import SSAdapter, SSShareWarning

# Images smaller than these fail inside the model (pooling to zero, window partitions).
INPUT_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}
DEFAULT_INPUT_SIZE = 32
CLASSES = 10
# One model per family for the README table: the smallest, and those whose 1x1 convs make
# the paper's scale per kernel a full reparameterisation.
REPRESENTATIVES = (
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_b7",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet1_0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "swin_t",
    "swin_v2_t",
    "vgg11_bn",
    "vit_b_16",
)


def models() -> list[str]:
    """Every classification model torchvision lists, by name."""
    return torchvision.models.list_models(module=torchvision.models)


def parameter_count(name: str) -> int:
    """The parameters of ``name`` with its 1000-class head, as torchvision's weights state them."""
    return next(iter(torchvision.models.get_model_weights(name))).meta["num_params"]


def family(name: str) -> str:
    """The torchvision module that builds ``name``: ``"resnet"`` for resnet18 and wide_resnet50_2."""
    return torchvision.models.get_model_builder(name).__module__.rpartition(".")[2]


def input_size(name: str) -> int:
    """The smallest square image side used for ``name`` (vision transformers are built for it)."""
    return INPUT_SIZE.get(name, DEFAULT_INPUT_SIZE)


def vit_side(name: str) -> int:
    """The image side a ViT is built for here: its position embedding is sized for one side, and
    the smallest its patch allows keeps it small (vit_b_16: 85.7 M parameters, 86.6 M at 224 px)."""
    return 2 * int(name.rpartition("_")[2])


def shown(name: str) -> str:
    """A model's name in the table, with the side a ViT is built for, since it sets its size."""
    return f"{name} at {vit_side(name)} px" if family(name) == "vision_transformer" else name


def build(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """``name`` with random weights, a 10-class head, built for :func:`input_size` where it must be.

    On ``device="meta"`` nothing is allocated: enough for counting parameters.
    """
    options = {"num_classes": CLASSES}
    if family(name) == "vision_transformer":
        options["image_size"] = vit_side(name)
    with warnings.catch_warnings(), torch.device(device):
        # googlenet and inception_v3 announce a change of their default initialisation.
        warnings.simplefilter("ignore", FutureWarning)
        return torchvision.models.get_model(name, weights=None, **options)


def image_side(name: str, model: nn.Module) -> int:
    """The side of the test images: what a ViT was built for, else :func:`input_size`."""
    return getattr(model, "image_size", input_size(name))


def describe(model: nn.Module, granularity: str) -> dict[str, object]:
    """Layers adapted by type, SS parameters and their share of ``model`` at ``granularity``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = SSAdapter(model, granularity=granularity).parameter_report()
    kinds = report["kernel"].iloc[:-1]
    total = report.iloc[-1]
    return {
        "conv": int(kinds.str.contains("x").sum()),
        "linear": int((kinds == "linear").sum()),
        "attention": int((kinds == "attention").sum()),
        "ss": int(total["ss"]),
        "share": float(total["share"]),
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def check_model(name: str, seed: int = 0) -> dict[str, object]:
    """Build ``name`` with random weights and check SS on it in eval mode.

    Returns:
        ``init_error`` and ``fold_error`` (the largest output difference over the
        output's scale, at least 1), ``share`` (of the backbone SS learns at the
        default granularity), ``share_warnings`` (how many :class:`SSShareWarning`
        the adapter raised) and ``no_gradient`` (the adapted layers whose Φ got no
        non-zero gradient: in eval mode, those of auxiliary classifiers).

    Example::

        result = check_model("resnet18")
        assert result["fold_error"] < 1e-5 and not result["no_gradient"]
    """
    torch.manual_seed(seed)
    model = build(name).eval()
    with torch.no_grad():
        # torchvision zero-initialises some heads (ViT's); Φ below them would get no gradient.
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(std=0.02)
    side = image_side(name, model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, side, side, generator=generator)
    with torch.no_grad():
        reference = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = SSAdapter(model).eval()
    share_warnings = sum(issubclass(w.category, SSShareWarning) for w in caught)
    with torch.no_grad():
        init_error = _relative(adapter(x), reference)
        for parameter in adapter.ss_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        fold_error = _relative(adapter.fold().eval()(x), adapter(x))

    output = adapter(x)
    (output * torch.randn(output.shape, generator=generator)).sum().backward()
    no_gradient = [
        name
        for name, scale, shift in zip(adapter.conv_names, adapter.scales, adapter.shifts)
        if not any(p.grad is not None and p.grad.any() for p in (scale, shift))
    ]
    return {
        "init_error": init_error,
        "fold_error": fold_error,
        "share": float(adapter.parameter_report()["share"].iloc[-1]),
        "share_warnings": share_warnings,
        "no_gradient": no_gradient,
    }


@click.command()
@click.option("--check", is_flag=True, help="Also run check_model on every model (random weights, CPU).")
@click.option("--max-params", type=float, default=float("inf"), help="Skip models with more parameters.")
@click.option("--markdown", is_flag=True, help="Print a markdown table of the REPRESENTATIVES (the rest to stderr).")
def main(check: bool, max_params: float, markdown: bool) -> None:
    """Print what SS adapts and learns on every torchvision classification model."""
    rows = []
    for name in models():
        size = parameter_count(name)
        if size > max_params:
            continue
        try:
            model = build(name, "meta")
        except NotImplementedError:
            # RegNet computes its widths from tensors, which a meta device cannot read back.
            model = build(name)
        auto, kernel = describe(model, "auto"), describe(model, "kernel")
        row = {
            "family": family(name),
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "conv": auto["conv"],
            "linear": auto["linear"],
            "attention": auto["attention"],
            "ss auto": auto["ss"],
            "share auto": auto["share"],
            "ss kernel": kernel["ss"],
            "share kernel": kernel["share"],
        }
        if check:
            row.update({key: value for key, value in check_model(name).items() if key != "share"})
        rows.append(row)
        click.echo(
            " ".join(
                f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()
            ),
            err=markdown,
        )
    frame = pd.DataFrame(rows)
    if markdown:
        chosen = frame[frame["model"].isin(REPRESENTATIVES)]
        table = chosen.assign(
            model=chosen["model"].map(shown),
            **{column: (100 * chosen[column]).map("{:.1f} %".format) for column in ("share auto", "share kernel")},
        )
        click.echo(
            table[
                [
                    "family",
                    "model",
                    "params",
                    "conv",
                    "linear",
                    "attention",
                    "ss auto",
                    "share auto",
                    "ss kernel",
                    "share kernel",
                ]
            ].to_markdown(index=False, intfmt=",")
        )
    worst = frame[["share auto", "share kernel"]].max()
    click.echo(
        f"{len(frame)} models; largest share of the backbone: auto {worst['share auto']:.1%}, "
        f"kernel {worst['share kernel']:.1%}"
    )
    if check:
        click.echo(
            f"largest error at init {frame['init_error'].max():.2g}, after fold "
            f"{frame['fold_error'].max():.2g}; models with a layer whose Φ got no gradient: "
            f"{list(frame.loc[frame['no_gradient'].map(len) > 0, 'model'])}"
        )


if __name__ == "__main__":
    main()
