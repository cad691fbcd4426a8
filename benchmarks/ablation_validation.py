"""Pick the FT ablation rows' outer learning rate on the validation split (never the test split).

The FT rows (``ft-last``, ``ft-all``) meta-learn pretrained weights themselves,
where SS meta-learns Φ; the paper gives them no learning rate of their own. This
meta-trains a row under each candidate ``MTLConfig.finetune_encoder_lr`` on the
bench's shared pretraining (run once into ``--out`` or read back from it) and
prints the validation curve that ``meta_train`` records: the test split is never
read.

    MTL_DATA=... .venv/bin/python benchmarks/ablation_validation.py --out /tmp/abl-val \
        --rows ft-all --lrs 1e-3,1e-4 --shots 1
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import pandas as pd
import torch

from mtl_plugin.bench.methods import METHODS
from mtl_plugin.bench.methods.mtl import MTLConfig
from mtl_plugin.bench.runner import BenchConfig, shared_pretraining
from mtl_plugin.data import get_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="bench output folder holding (or to hold) the pretraining")
    parser.add_argument("--rows", default="ft-all", help="comma-separated ablation rows")
    parser.add_argument("--lrs", default="1e-3,1e-4", help="comma-separated finetune_encoder_lr candidates")
    parser.add_argument("--shots", default="1", help="comma-separated shot settings")
    args = parser.parse_args()
    config = BenchConfig.quick(out=args.out, progress=False)
    benchmark = get_benchmark(
        config.dataset, root=config.root, image_size=config.image_size, data_seed=config.data_seed
    )
    pretrained = shared_pretraining(config, benchmark, torch.device("cpu"))
    rows = []
    for shots in (int(s) for s in args.shots.split(",")):
        for name in args.rows.split(","):
            for lr in (float(v) for v in args.lrs.split(",")):
                method_class, _ = METHODS[name]
                method = method_class(replace(MTLConfig.quick(), finetune_encoder_lr=lr))
                work = config.out / "validation" / f"{name}-lr{lr:g}-{shots}s"
                context = config.context(benchmark, shots, work, torch.device("cpu"), pretrained)
                method.fit(context)
                curve = pd.read_csv(work / "metrics.csv").dropna(subset=["val_accuracy"])
                for _, point in curve.iterrows():
                    rows.append(
                        {
                            "row": name,
                            "lr": lr,
                            "shots": shots,
                            "iteration": int(point["iteration"]),
                            "val_accuracy": round(point["val_accuracy"], 2),
                            "val_ci95": round(point["val_ci95"], 2),
                        }
                    )
                print(pd.DataFrame(rows).tail(len(curve)).to_string(index=False), flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
