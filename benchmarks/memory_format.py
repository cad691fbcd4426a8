"""How the package's Conv4 and ResNet-12 run on a CPU: channels-last memory format against NCHW
(a training step and an evaluation forward), the quick bench's ``maml`` meta-step per layout, and
Conv4's block order; each timed in turns in one process.

The package's own backbones keep their weights and activations channels-last (see
``mtl_plugin.backbones``); this script measures why. The second table times one second-order
MAML meta-step as the quick ``maml`` row takes it (Conv4 of 32 filters at 28 px, 5-way 5-shot, 5
queries, one inner step): its batch-norm double backward is why that row runs NCHW. The third
times a Conv4 training step at the quick bench's batch sizes (the pretraining's 64 images,
``protonet-conv4``'s 20-way episodes of 120 and 200) with each block's ReLU before its pooling
(the textbook order) and after it (the package's): the same outputs and gradients to the bit,
which it checks.

Each layout gets its own copy of the same initial weights and the same batch; the figures are
medians over ``--repeats`` interleaved turns, and ``speed-up`` is NCHW time over channels-last
time (the MAML table's ``NCHW speed-up`` the inverse). Outputs agree to float rounding (``max
|diff|``, relative to the output's largest value).

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
from torch.func import functional_call

from mtl_plugin.backbones import build_backbone, conv4

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


def _median_ms(steps: dict, repeats: int) -> dict:
    """Each step's median milliseconds over ``repeats`` turns, the steps taken in turns; the first
    turn, which warms up allocators and oneDNN, is not counted."""
    times = {key: [] for key in steps}
    for turn in range(repeats + 1):
        for key, step in steps.items():
            seconds = _timed(step)
            if turn:
                times[key].append(seconds)
    return {key: statistics.median(values) * 1000 for key, values in times.items()}


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

    median = _median_ms(
        {
            (layout, kind): partial(step, model)
            for layout, model in models.items()
            for kind, step in (("train", train_step), ("eval", evaluate))
        },
        repeats,
    )
    with torch.no_grad():
        reference = models["nchw"].eval()(x)
        difference = (models["channels-last"].eval()(x) - reference).abs().max() / reference.abs().max()
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


def measure_maml_step(repeats: int, seed: int) -> dict:
    """Milliseconds of one second-order MAML meta-step per layout (median of ``repeats`` turns)."""
    torch.manual_seed(seed)
    channels_last = conv4(in_channels=1, hidden=32, num_classes=5, image_size=28)
    layouts = {"nchw": copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)}
    layouts["channels-last"] = channels_last
    support, query = torch.randn(25, 1, 28, 28), torch.randn(25, 1, 28, 28)
    labels = torch.arange(5).repeat(5)

    def meta_step(model):
        # One inner SGD step (lr 0.1) kept in the graph, then the query loss's backward through it.
        model.train().zero_grad(set_to_none=True)
        weights = dict(model.named_parameters())
        inner = F.cross_entropy(functional_call(model, weights, (support,)), labels)
        gradients = torch.autograd.grad(inner, list(weights.values()), create_graph=True)
        adapted = {name: w - 0.1 * g for (name, w), g in zip(weights.items(), gradients)}
        F.cross_entropy(functional_call(model, adapted, (query,)), labels).backward()

    median = _median_ms({layout: partial(meta_step, model) for layout, model in layouts.items()}, repeats)
    return {
        "step": "maml meta-step, conv4-32 28 px, 5-way 5-shot",
        "NCHW (ms)": round(median["nchw"], 1),
        "channels-last (ms)": round(median["channels-last"], 1),
        "NCHW speed-up": round(median["channels-last"] / median["nchw"], 2),
    }


def measure_block_order(batch: int, repeats: int, seed: int) -> dict:
    """Milliseconds of a Conv4 training step (64 filters, 28 px, channels-last) with each block's ReLU
    before its pooling and after it, as Conv4 runs (median of ``repeats`` turns)."""
    torch.manual_seed(seed)
    pooled_first = conv4(in_channels=1, hidden=64, image_size=28)
    textbook = copy.deepcopy(pooled_first)
    blocks = [list(textbook.layers[i : i + 4]) for i in range(0, len(textbook.layers), 4)]
    textbook.layers = nn.Sequential(*[m for conv, bn, pool, relu in blocks for m in (conv, bn, relu, pool)])
    models = {"textbook": textbook, "pool first": pooled_first}
    x = torch.randn(batch, 1, 28, 28)

    def train_step(model):
        model.train().zero_grad(set_to_none=True)
        output = model(x)
        output.pow(2).mean().backward()
        return output

    outputs = {order: train_step(model).detach() for order, model in models.items()}
    same = torch.equal(outputs["textbook"], outputs["pool first"]) and all(
        torch.equal(a.grad, b.grad) for a, b in zip(textbook.parameters(), pooled_first.parameters())
    )
    median = _median_ms({order: partial(train_step, model) for order, model in models.items()}, repeats)
    return {
        "step": f"conv4-64 28 px train step, batch {batch}",
        "ReLU then pool (ms)": round(median["textbook"], 1),
        "pool then ReLU (ms)": round(median["pool first"], 1),
        "speed-up": round(median["textbook"] / median["pool first"], 2),
        "same bits": same,
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
    print(pd.DataFrame([measure_maml_step(repeats, seed)]).to_string(index=False))
    print(pd.DataFrame([measure_block_order(batch, repeats, seed) for batch in (64, 120, 200)]).to_string(index=False))


if __name__ == "__main__":
    main()
