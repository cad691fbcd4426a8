"""MetaNet on the embedded kanji data set: N-way K-shot test accuracy ± 95% CI after a stated episode budget.

Trains one MetaNet per ways setting on the kanji train split (checkpointed in
``--work-dir``, so a rerun resumes or reuses a finished fit), then evaluates
it on seeded tasks of the test split. The defaults are ``mtl bench``'s quick
profile (:meth:`MetaNetConfig.quick`); the options move it toward the paper's
networks. The budget is a number of training episodes (one task each), so the
same options give the same figures on any machine; the training seconds are
printed beside it. The paper's Omniglot
figures are printed beside ours for reference (a different data set: not
comparable one to one).

    .venv/bin/python benchmarks/metanet_kanji.py [--ways 5 --ways 20] [--shots 1] [--episodes 900]
        [--tasks 300] [--filters 64 --augmented-layers 3]
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.metanet import MetaNet, MetaNetConfig
from mtl_plugin.data import get_benchmark
from mtl_plugin.evaluation import EvaluationConfig, evaluate

PAPER_OMNIGLOT_1SHOT = {5: 98.95, 10: 98.67, 15: 97.11, 20: 97.00}
QUICK = MetaNetConfig.quick()


@click.command()
@click.option("--ways", "ways_list", type=int, multiple=True, default=(5, 20), show_default=True)
@click.option("--shots", type=int, default=1, show_default=True)
@click.option(
    "--episodes",
    type=click.IntRange(min=1),
    default=QUICK.max_episodes,
    show_default=True,
    help="training episodes (tasks) per setting",
)
@click.option("--train-queries", type=click.IntRange(min=1), default=QUICK.train_queries, show_default=True)
@click.option(
    "--filters",
    type=click.IntRange(min=1),
    default=QUICK.filters,
    show_default=True,
    help="conv filters per layer of b and u (the paper's: 64)",
)
@click.option(
    "--augmented-layers",
    type=int,
    default=QUICK.augmented_layers,
    show_default=True,
    help="layers with fast weights, from the classifier down (the paper's: 3)",
)
@click.option("--tasks", type=int, default=300, show_default=True, help="test tasks")
@click.option("--queries", type=int, default=15, show_default=True, help="test queries per class")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/metanet-kanji"), show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="also write the figures here")
def main(
    ways_list, shots, episodes, train_queries, filters, augmented_layers, tasks, queries, seed, work_dir, json_out
):
    """Train and evaluate MetaNet on kanji; print accuracy ± CI per ways setting."""
    benchmark = get_benchmark("kanji", progress=False)
    config = replace(
        QUICK, max_episodes=episodes, train_queries=train_queries, filters=filters, augmented_layers=augmented_layers
    )
    rows = []
    for ways in ways_list:
        method = MetaNet(config)
        context = BenchContext(
            benchmark=benchmark,
            ways=ways,
            shots=shots,
            queries=queries,
            seed=seed,
            work_dir=work_dir / f"{ways}way-{shots}shot-{episodes}ep-f{filters}-aug{augmented_layers}",
            profile="quick",
            device=torch.device("cpu"),
            pretrained_backbone=lambda: None,
        )
        # A reused finished fit reports the seconds of loading it, not of training.
        start = time.perf_counter()
        method.fit(context)
        fit_seconds = time.perf_counter() - start
        result = evaluate(
            method.predict,
            benchmark.test,
            EvaluationConfig(ways=ways, shots=shots, queries=queries, tasks=tasks, seed=seed),
            description=f"metanet {ways}-way",
        )
        row = {
            "ways": ways,
            "shots": shots,
            "episodes": len(method.losses),
            "fit_seconds": fit_seconds,
            **result.as_dict(),
            "paper_omniglot": PAPER_OMNIGLOT_1SHOT.get(ways) if shots == 1 else None,
        }
        rows.append(row)
        click.echo(
            f"{ways}-way {shots}-shot, {filters} filters, {augmented_layers} augmented layers: "
            f"{result} after {row['episodes']} episodes ({fit_seconds:.0f} s); "
            f"paper, Omniglot: {row['paper_omniglot']}"
        )
    if json_out is not None:
        from mtl_plugin.utils.io import atomic_write_text

        atomic_write_text(json_out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
