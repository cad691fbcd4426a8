"""Quick budgets of the MTL paper's table rows (matchingnet, meta-lstm, tadam) against protonet-conv4.

Fits each method with its quick profile (or ``--episodes name=N``) on the
embedded kanji data set and evaluates it on seeded tasks of the VALIDATION
split (budgets are picked there, never on the test split). The methods run in
turns in one process, on one thread, so that the seconds per cell (fit +
evaluation of ``--tasks`` tasks) can be compared as ratios to protonet-conv4,
the reference for what one quick cell may cost.

    MTL_DATA=/tmp/lead/qdata OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_table_budgets.py \
        [--methods protonet-conv4,matchingnet,meta-lstm,tadam] [--shots 1,5] [--episodes tadam=400]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from mtl_plugin.bench.methods import METHODS
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.data import get_benchmark
from mtl_plugin.evaluation import EvaluationConfig, evaluate

DEFAULT_METHODS = "protonet-conv4,matchingnet,meta-lstm,tadam"


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@click.command()
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="comma-separated bench names")
@click.option("--shots", default="1,5", show_default=True)
@click.option("--episodes", multiple=True, help="name=N: another training budget for one method")
@click.option("--tasks", type=int, default=300, show_default=True, help="validation tasks per cell")
@click.option("--queries", type=int, default=15, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(methods, shots, episodes, tasks, queries, seed):
    """Print validation accuracy and seconds per cell for each method and shot setting."""
    torch.set_num_threads(1)
    budgets = {name: int(n) for name, n in (item.split("=") for item in episodes)}
    benchmark = get_benchmark("kanji", image_size=28, data_seed=seed, progress=False)
    reference: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for shot in (int(s) for s in _split(shots)):
            for name in _split(methods):
                method_class, config_class = METHODS[name]
                config = config_class.quick()
                if name in budgets:
                    config = replace(config, max_episodes=budgets[name])
                method = method_class(config)
                context = BenchContext(
                    benchmark=benchmark,
                    ways=5,
                    shots=shot,
                    queries=queries,
                    seed=seed,
                    work_dir=Path(scratch) / f"{name}-{shot}",
                    profile="quick",
                    device=torch.device("cpu"),
                    pretrained_backbone=lambda: None,
                    progress=False,
                )
                start = time.perf_counter()
                method.fit(context)
                fit_seconds = time.perf_counter() - start
                start = time.perf_counter()
                result = evaluate(
                    method.predict, benchmark.val, EvaluationConfig(5, shot, queries, tasks, seed), progress=False
                )
                eval_seconds = time.perf_counter() - start
                cell = fit_seconds + eval_seconds
                reference.setdefault(shot, cell)
                click.echo(
                    f"{name:15s} {shot}-shot {config.max_episodes:5d} episodes: val {result} | "
                    f"fit {fit_seconds:5.1f} s, eval {eval_seconds:4.1f} s, cell {cell:5.1f} s "
                    f"({cell / reference[shot]:.2f}x the first method)",
                )


if __name__ == "__main__":
    main()
