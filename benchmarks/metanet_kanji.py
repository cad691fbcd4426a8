"""MetaNet on the embedded kanji data set: N-way 1-shot test accuracy ± 95% CI after a stated budget.

Trains one MetaNet per ways setting on the kanji train split (checkpointed in
``--work-dir``, so a rerun resumes or reuses a finished fit), then evaluates
it on seeded tasks of the test split. The paper's Omniglot figures are printed
beside ours for reference (a different data set: not comparable one to one).

    .venv/bin/python benchmarks/metanet_kanji.py [--ways 5 --ways 20] [--budget-s 45] [--tasks 300]
        [--augmented-layers 3]
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
import torch

from mtl_plugin.data import get_benchmark
from mtl_plugin.evaluation import EvaluationConfig, evaluate
from mtl_plugin.methods.base import BenchContext
from mtl_plugin.methods.metanet import MetaNet, MetaNetConfig

PAPER_OMNIGLOT_1SHOT = {5: 98.95, 10: 98.67, 15: 97.11, 20: 97.00}


@click.command()
@click.option("--ways", "ways_list", type=int, multiple=True, default=(5, 20), show_default=True)
@click.option("--shots", type=int, default=1, show_default=True)
@click.option("--budget-s", type=float, default=45.0, show_default=True, help="training seconds per setting")
@click.option("--max-episodes", type=int, default=30_000, show_default=True)
@click.option("--train-queries", type=int, default=5, show_default=True)
@click.option("--augmented-layers", type=int, default=MetaNetConfig.augmented_layers, show_default=True)
@click.option("--tasks", type=int, default=300, show_default=True, help="test tasks")
@click.option("--queries", type=int, default=15, show_default=True, help="test queries per class")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/metanet-kanji"),
              show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="also write the figures here")
def main(ways_list, shots, budget_s, max_episodes, train_queries, augmented_layers, tasks, queries, seed,
         work_dir, json_out):
    """Train and evaluate MetaNet on kanji; print accuracy ± CI per ways setting."""
    benchmark = get_benchmark("kanji", progress=False)
    config = replace(MetaNetConfig(), max_episodes=max_episodes, train_queries=train_queries,
                     augmented_layers=augmented_layers, time_budget_s=budget_s, checkpoint_every=25)
    rows = []
    for ways in ways_list:
        method = MetaNet(config)
        context = BenchContext(
            benchmark=benchmark, ways=ways, shots=shots, queries=queries, seed=seed,
            work_dir=work_dir / f"{ways}way-{shots}shot-aug{augmented_layers}", profile="quick",
            device=torch.device("cpu"), pretrained_backbone=lambda: None,
        )
        method.fit(context)
        result = evaluate(method.predict, benchmark.test,
                          EvaluationConfig(ways=ways, shots=shots, queries=queries, tasks=tasks, seed=seed),
                          description=f"metanet {ways}-way")
        row = {"ways": ways, "shots": shots, "episodes": len(method.losses), **result.as_dict(),
               "paper_omniglot": PAPER_OMNIGLOT_1SHOT.get(ways) if shots == 1 else None}
        rows.append(row)
        click.echo(f"{ways}-way {shots}-shot, {augmented_layers} augmented layers: {result} after "
                   f"{row['episodes']} episodes (budget {budget_s:.0f} s); "
                   f"paper, Omniglot: {row['paper_omniglot']}")
    if json_out is not None:
        from mtl_plugin.io import atomic_write_text

        atomic_write_text(json_out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
