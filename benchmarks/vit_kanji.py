"""Few-shot kanji with a small vision transformer: MTL's SS meta-trained against nearest class mean.

A torchvision ``VisionTransformer`` (28 px, 7 px patches, 4 layers, width 64, 4
heads; 0.14 M parameters; ``--patch`` changes the patch side) is pretrained on the kanji train split with
:func:`~mtl_plugin.training.pretrain.pretrain` (its classifier dropped), then wrapped in
:class:`~mtl_plugin.SSAdapter` (SS on the patch conv, every attention
in-projection and every linear layer) and meta-trained with
:func:`~mtl_plugin.training.meta_training.meta_train` (the best validation iteration kept,
iteration 0 included). Both are scored on the same seeded tasks of ``--split``:
the pretrained features with a nearest-class-mean classifier, and the meta-trained
learner (head adapted on the support set); the paired difference is printed with
its 95 % confidence interval. Settings are chosen with ``--split val``; the test
split is read once, with ``--split test``. Runs are checkpointed in ``--work-dir``:
a rerun reuses them.

The pretraining has the quick bench's budget (40 epochs of 100 steps of 64 images, a
cosine schedule) under the recipe of vision transformers trained from scratch: AdamW
(lr 1e-3, weight decay 0.05) after 200 steps of linear warmup, label smoothing 0.1. The
classifier it trains is :func:`pretrain`'s own ``nn.Linear`` (PyTorch's default init), not
torchvision's zero-initialised head, so the body has a gradient from the first step. The
quick bench's own recipe (``--optimizer sgd --pretrain-lr 0.1 --weight-decay 5e-4
--warmup-steps 0 --label-smoothing 0``) leaves this ViT at chance. The meta-training is the
bench's MTL settings (``MTLConfig.quick``) run for 1,000 iterations instead of 100.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_kanji.py --split val [--shots 1]
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import torch
from torch import nn
from torchvision.models import VisionTransformer

from mtl_plugin import SSAdapter
from mtl_plugin.data import get_benchmark
from mtl_plugin.evaluation import EvaluationConfig, evaluate, nearest_centroid
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.training.meta_training import meta_train
from mtl_plugin.training.pretrain import OPTIMIZERS, PretrainConfig, pretrain

IMAGE_SIZE = 28


def small_vit(
    in_channels: int = 1, *, patch: int = 7, layers: int = 4, width: int = 64, heads: int = 4, seed: int = 0
) -> VisionTransformer:
    """A torchvision ViT for ``IMAGE_SIZE`` px images of ``in_channels`` channels, without a classifier.

    Example::

        small_vit()(torch.randn(2, 1, 28, 28)).shape   # (2, 64)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(
            image_size=IMAGE_SIZE,
            patch_size=patch,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=width,
            mlp_dim=2 * width,
        )
        # torchvision's patch embedding takes RGB; kanji is grey.
        vit.conv_proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
    vit.heads = nn.Identity()
    vit.feature_dim = width
    return vit


def _paired(a, b) -> tuple[float, float]:
    differences = [x - y for x, y in zip(a.accuracies, b.accuracies)]
    mean = sum(differences) / len(differences)
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / len(differences))
    return mean, 1.96 * std / math.sqrt(len(differences))


@click.command()
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option("--shots", type=int, default=1, show_default=True)
@click.option("--tasks", type=int, default=300, show_default=True, help="5-way tasks scored")
@click.option("--epochs", type=int, default=40, show_default=True, help="pretraining epochs of 100 steps")
@click.option("--patch", type=int, default=7, show_default=True, help="patch side in px (divides 28)")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--pretrain-lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--warmup-steps", type=int, default=200, show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--iterations", type=int, default=1000, show_default=True, help="meta-training iterations")
@click.option("--encoder-lr", type=float, default=1e-3, show_default=True, help="Adam lr of Φ")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/vit-kanji"), show_default=True)
def main(
    split,
    shots,
    tasks,
    epochs,
    patch,
    optimizer,
    pretrain_lr,
    weight_decay,
    warmup_steps,
    label_smoothing,
    iterations,
    encoder_lr,
    seed,
    work_dir,
):
    """Pretrain a small ViT on kanji, meta-train SS on it, and score both against nearest class mean."""
    torch.manual_seed(seed)
    benchmark = get_benchmark("kanji", image_size=IMAGE_SIZE, progress=False)
    start = time.perf_counter()
    recipe = f"{optimizer}-lr{pretrain_lr}-wd{weight_decay}-w{warmup_steps}-ls{label_smoothing}-p{patch}-e{epochs}"
    backbone = pretrain(
        benchmark,
        PretrainConfig(
            epochs=epochs,
            batch_size=64,
            lr=pretrain_lr,
            schedule="cosine",
            steps_per_epoch=100,
            val_tasks=50,
            seed=seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            label_smoothing=label_smoothing,
        ),
        work_dir / f"pretrain-{recipe}",
        progress=False,
        backbone=small_vit(benchmark.channels, patch=patch, seed=seed),
    )
    pretrain_seconds = time.perf_counter() - start
    adapter = SSAdapter(backbone)
    share = adapter.parameter_report()["share"].iloc[-1]
    click.echo(
        f"backbone {sum(p.numel() for p in backbone.parameters()):,} parameters; SS learns "
        f"{sum(p.numel() for p in adapter.ss_parameters()):,} ({share:.1%}) on {len(adapter.conv_names)} "
        f"layers; pretraining {pretrain_seconds:.0f} s"
    )

    # The quick bench's MTL settings (MTLConfig.quick) at this shot, but for the iterations.
    config = MetaTrainConfig(
        shots=shots,
        iterations=iterations,
        meta_batch=2,
        lr_step=iterations,
        inner_steps=20,
        test_inner_steps=50,
        encoder_lr=encoder_lr,
        head_lr=1e-2,
        val_every=50,
        val_tasks=50,
        checkpoint_every=50,
        seed=seed,
    )
    learner = MetaTransferLearner(adapter, ways=5, config=config)
    start = time.perf_counter()
    result = meta_train(
        learner,
        benchmark,
        work_dir / f"meta-s{shots}-it{iterations}-lr{encoder_lr}-{recipe}",
        resume=True,
        progress=False,
    )
    click.echo(
        f"meta-training {time.perf_counter() - start:.0f} s; best val iteration {result.best_iteration} "
        f"of {iterations} ({result.best_accuracy:.2f} % on {config.val_tasks} val tasks)"
    )

    protocol = EvaluationConfig(ways=5, shots=shots, tasks=tasks, seed=seed + 1)
    data = getattr(benchmark, split)
    nearest = evaluate(nearest_centroid(backbone), data, protocol, progress=False)
    mtl = evaluate(learner.predict, data, protocol, progress=False)
    difference, ci = _paired(mtl, nearest)
    click.echo(
        f"{split}, 5-way {shots}-shot, {tasks} tasks: nearest class mean {nearest}; "
        f"SS meta-trained {mtl}; difference {difference:+.2f} ± {ci:.2f}"
    )


if __name__ == "__main__":
    main()
