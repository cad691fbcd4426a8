"""Cost of one meta-train step relative to one plain forward+backward of the backbone.

One MTL meta-train step (5-way 1-shot, 15 queries: 80 images, 20 inner steps,
second order) divided by one forward+backward of the bare backbone on the same
80 images, both timed in turns in this run. Goal: at most 1.3 on CPU, which holds only if
the inner loop never re-runs the backbone.

    .venv/bin/python benchmarks/meta_step.py [--repeats 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtl_plugin.backbones import build_backbone
from mtl_plugin.meta_transfer import MetaTrainConfig, MetaTransferLearner
from mtl_plugin.ss import SSAdapter

WAYS, SHOTS, QUERIES = 5, 1, 15
CASES = (("resnet18-small", 3, 32), ("resnet18-small", 1, 28), ("resnet12", 3, 84))


def interleaved_medians(functions, repeats: int) -> list:
    """Median seconds of each function, timed in turns so that drift hits all of them alike."""
    for function in functions:
        function()  # warm-up: allocator and kernel selection
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def measure(name: str, channels: int, side: int, repeats: int, first_order: bool) -> tuple:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(WAYS * (SHOTS + QUERIES), channels, side, side, generator=generator)
    labels = torch.arange(WAYS).repeat_interleave(SHOTS + QUERIES)
    support = torch.cat([images[labels == c][:SHOTS] for c in range(WAYS)])
    query = torch.cat([images[labels == c][SHOTS:] for c in range(WAYS)])
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES)

    plain = build_backbone(name, in_channels=channels, image_size=side)
    head = torch.nn.Linear(plain.feature_dim, WAYS)

    def plain_step():
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(head(plain(images)), labels).backward()

    config = MetaTrainConfig(ways=WAYS, shots=SHOTS, queries=QUERIES, inner_steps=20, first_order=first_order)
    learner = MetaTransferLearner(SSAdapter(build_backbone(name, in_channels=channels, image_size=side)),
                                  WAYS, config)

    def meta_step():
        learner.meta_train_step([(support, support_y, query, query_y)])

    plain_seconds, meta_seconds = interleaved_medians([plain_step, meta_step], repeats)
    return plain_seconds, meta_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--backbone", action="append", default=None,
                        help="only these backbones (repeatable): resnet18-small, resnet12")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'backbone':<16}{'input':>10}{'order':>8}{'fwd+bwd s':>12}{'meta step s':>13}{'ratio':>8}")
    for name, channels, side in CASES:
        if args.backbone and name not in args.backbone:
            continue
        for first_order in (False, True):
            plain, meta = measure(name, channels, side, args.repeats, first_order)
            order = "first" if first_order else "second"
            print(f"{name:<16}{f'{channels}x{side}px':>10}{order:>8}{plain:>12.4f}{meta:>13.4f}{meta / plain:>8.2f}")


if __name__ == "__main__":
    main()
