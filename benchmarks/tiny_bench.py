"""Behaviour of the whole bench in about a minute: every row of both suites on tiny data and budgets.

Every row of the ``comparison`` and ``ablation`` suites runs on 30 kanji classes of 20 images at
28 px, one shot setting, 6 test tasks, a pretraining of two steps and each row's quick budget cut
to a few episodes or meta-iterations. The result CSVs and claims are written under ``--out`` and
their SHA-256 digests printed: a change meant to keep behaviour (a refactor) keeps them, byte for
byte, on one machine and thread count. Run it on both commits and compare the digests::

    export OMP_NUM_THREADS=1 MTL_DATA=/tmp/tiny-data
    python benchmarks/tiny_bench.py --out /tmp/tiny-before
    git checkout <other> && python benchmarks/tiny_bench.py --out /tmp/tiny-after
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from mtl_plugin.bench import runner
from mtl_plugin.bench.runner import BenchConfig, run_bench
from mtl_plugin.training.pretrain import PretrainConfig

TINY = dict(
    dataset="kanji",
    dataset_options={"num_classes": 30, "instances": 20},
    shots=(1,),
    queries=3,
    test_tasks=6,
    backbone="conv4",
    progress=False,
    pretrain=PretrainConfig(backbone="conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2, val_queries=3),
)


def tiny_budgets(build_method):
    """``build_method`` with each row's quick budget cut to 3 episodes or 2 meta-iterations."""

    def build(name: str, profile: str):
        method = build_method(name, profile)
        config = method.config
        if hasattr(config, "max_episodes"):
            config.max_episodes = 3
        if hasattr(config, "meta"):
            config.meta = replace(config.meta, iterations=2, val_every=2, val_tasks=2, checkpoint_every=2)
        return method

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the runs and tables")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner.build_method = tiny_budgets(runner.build_method)
    for suite in ("comparison", "ablation"):
        result = run_bench(BenchConfig.quick(suite=suite, out=args.out, **TINY), echo=lambda line: None)
        for kind in ("csv", "claims"):
            path = result.files[kind]
            print(f"{suite:10s} {path.name:40s} {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
