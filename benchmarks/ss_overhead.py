"""Forward+backward time of an SSAdapter divided by that of the plain backbone.

Both are timed in the same run, interleaved, on the same batch; the figure is
the ratio of medians. Goal (issue 2): at most 1.15 on CPU.

    .venv/bin/python benchmarks/ss_overhead.py [--repeats 7]
"""

from __future__ import annotations

import statistics
import time

import click
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin import SSAdapter
from mtl_plugin.backbones import build_backbone

CASES = (
    # (label, backbone name, image size, batch)
    ("resnet18 small_input", "resnet18-small", 32, 80),
    ("ResNet-12", "resnet12", 84, 80),
)


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.mse_loss(model(x), target)
    loss.backward()
    return time.perf_counter() - start


def measure(name: str, size: int, batch: int, repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    adapted = SSAdapter(build_backbone(name)).train()
    # Two references: the backbone as it is usually trained (every weight learns, BN on
    # batch statistics), and the same backbone in the adapter's own setting (BN in eval
    # mode), so the second ratio isolates what the scaling and shifting cost.
    plain_train = build_backbone(name).train()
    plain_frozen_bn = build_backbone(name).train()
    for module in plain_frozen_bn.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    models = {"plain": plain_train, "plain, BN frozen": plain_frozen_bn, "adapter": adapted}
    x = torch.randn(batch, 3, size, size)
    target = torch.randn(batch, plain_train.feature_dim)
    for model in models.values():
        _step(model, x, target)  # warm-up: allocator and kernel selection
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            model.zero_grad(set_to_none=True)
            times[label].append(_step(model, x, target))
    medians = {label: statistics.median(values) for label, values in times.items()}
    return {
        **{f"{label} s": round(value, 4) for label, value in medians.items()},
        "ratio": round(medians["adapter"] / medians["plain"], 3),
        "ratio vs BN frozen": round(medians["adapter"] / medians["plain, BN frozen"], 3),
    }


@click.command()
@click.option("--repeats", default=7, show_default=True, help="Timed steps per model.")
@click.option("--seed", default=0, show_default=True)
def main(repeats: int, seed: int) -> None:
    rows = []
    for label, name, size, batch in CASES:
        row = {"backbone": label, "input": f"{batch}x3x{size}x{size}"}
        row.update(measure(name, size, batch, repeats, seed))
        rows.append(row)
        click.echo(f"{label}: {row}", err=True)
    frame = pd.DataFrame(rows)
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}")
    click.echo(frame.to_string(index=False))
    worst = frame[["ratio", "ratio vs BN frozen"]].max().max()
    click.echo(f"goal: ratio <= 1.15; worst {worst:.3f}")


if __name__ == "__main__":
    main()
