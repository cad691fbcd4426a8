"""Conv4 and ResNet-12 in channels-last memory format against NCHW: a training step and an
evaluation forward, timed in turns in one process.

The package's own backbones keep their weights and activations channels-last (see
``mtl_plugin.backbones``); this script measures why. Each layout gets its own copy of the same
initial weights and the same batch; the figures are medians over ``--repeats`` interleaved turns,
and ``speed-up`` is NCHW time over channels-last time. Outputs agree to float rounding
(``max |diff|``, relative to the output's largest value).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_format.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from functools import partial

import click
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.backbones import build_backbone

CASES = (
    # (backbone, image size, batch): the quick bench's 5-way task at 28 px, and the paper's 84 px ResNet-12.
    ("conv4", 28, 80),
    ("conv4", 84, 80),
    ("resnet12", 84, 20),
)


class _Nchw(nn.Module):
    """The backbone with NCHW weights, fed NCHW input: the layout before channels-last."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The backbone's own forward would convert x to channels-last: call its layers directly.
        inner = self.backbone
        if hasattr(inner, "pool"):  # ResNet-12
            return inner.head(inner.pool(inner.layers(x)).flatten(1))
        return inner.head(inner.layers(x).flatten(1))


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(name: str, size: int, batch: int, repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    channels_last = build_backbone(name, image_size=size)
    models = {"nchw": _Nchw(channels_last), "channels-last": channels_last}
    x = torch.randn(batch, 3, size, size)
    target = torch.randn(batch, channels_last.feature_dim)

    def train_step(model):
        model.train()
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            model(x)

    times = {(layout, kind): [] for layout in models for kind in ("train", "eval")}
    for turn in range(repeats + 1):
        for layout, model in models.items():
            for kind, step in (("train", train_step), ("eval", evaluate)):
                seconds = _timed(partial(step, model))
                if turn:  # the first turn warms up allocators and oneDNN
                    times[layout, kind].append(seconds)
    with torch.no_grad():
        reference = models["nchw"].eval()(x)
        difference = (models["channels-last"].eval()(x) - reference).abs().max() / reference.abs().max()
    median = {key: statistics.median(values) * 1000 for key, values in times.items()}
    return {
        "backbone": f"{name} {size} px, batch {batch}",
        "train step NCHW (ms)": round(median["nchw", "train"], 1),
        "train step channels-last (ms)": round(median["channels-last", "train"], 1),
        "train speed-up": round(median["nchw", "train"] / median["channels-last", "train"], 2),
        "eval NCHW (ms)": round(median["nchw", "eval"], 1),
        "eval channels-last (ms)": round(median["channels-last", "eval"], 1),
        "eval speed-up": round(median["nchw", "eval"] / median["channels-last", "eval"], 2),
        "max |diff|": f"{difference.item():.1e}",
    }


@click.command()
@click.option("--repeats", default=9, show_default=True, help="timed turns per layout")
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's)")
@click.option("--seed", default=0, show_default=True)
def main(repeats: int, threads: int | None, seed: int) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    rows = [measure(name, size, batch, repeats, seed) for name, size, batch in CASES]
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
