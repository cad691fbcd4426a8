"""Meta-train tasks/s and pretraining images/s on 1 and on N processes (torchrun), and the scaling efficiency.

Strong scaling: the global meta-batch (``--meta-batch`` tasks, 5-way 1-shot 15-query) and the
global pretraining batch (``--batch-size`` images) stay fixed and are divided among the
processes, as ``mtl meta-train`` and ``mtl pretrain`` divide them under torchrun. Each phase
runs the library's own code: ``MetaTrainer.step`` (gradients averaged across
ranks) and a ``DistributedDataParallel`` classifier with SGD (pretraining's step), on synthetic
images, ``--steps`` timed steps after ``--warmup`` ones; every process uses one thread.
Efficiency = throughput(N) / (N x throughput(1)).

    .venv/bin/python benchmarks/distributed_scaling.py                     # 1 and 2 processes on CPU
    .venv/bin/python benchmarks/distributed_scaling.py --nproc 4 --device cuda --backbone resnet12 --image-size 84
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WAYS, SHOTS, QUERIES = 5, 1, 15


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones, the slowest rank's."""
    from mtl_plugin.utils import distributed

    for _ in range(warmup):
        step()
    distributed.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()
    return time.perf_counter() - start


def _meta_train(args, device: torch.device, ranks: int) -> float:
    from mtl_plugin.backbones import build_backbone
    from mtl_plugin.meta_transfer import MetaTrainConfig, MetaTransferLearner
    from mtl_plugin.ss import SSAdapter
    from mtl_plugin.training.meta_step import MetaTrainer

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS).repeat(SHOTS + QUERIES)
    tasks = [
        (torch.randn(len(labels), args.channels, args.image_size, args.image_size, generator=generator), labels)
        for _ in range(args.meta_batch // ranks)
    ]
    config = MetaTrainConfig(ways=WAYS, shots=SHOTS, queries=QUERIES, meta_batch=args.meta_batch)
    backbone = build_backbone(args.backbone, in_channels=args.channels, image_size=args.image_size)
    learner = MetaTransferLearner(SSAdapter(backbone), WAYS, config).to(device)
    trainer = MetaTrainer(learner)
    seconds = _timed(lambda: trainer.step(tasks), args.steps, args.warmup, device)
    return args.steps * args.meta_batch / seconds


def _pretrain(args, device: torch.device, ranks: int) -> float:
    from mtl_plugin.backbones import build_backbone

    per_rank = args.batch_size // ranks
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(per_rank, args.channels, args.image_size, args.image_size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (per_rank,), generator=generator).to(device)
    backbone = build_backbone(args.backbone, in_channels=args.channels, image_size=args.image_size)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, args.classes)).to(device)
    if ranks > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    seconds = _timed(step, args.steps, args.warmup, device)
    return args.steps * args.batch_size / seconds


def worker(args) -> None:
    """One rank of a torchrun job: time both phases; rank 0 writes the throughputs as JSON."""
    from mtl_plugin.utils import distributed

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = distributed.setup(torch.device(args.device))
    ranks = distributed.world_size()
    result = {
        "processes": ranks,
        "meta-train tasks/s": _meta_train(args, device, ranks),
        "pretrain images/s": _pretrain(args, device, ranks),
    }
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(result))


def _launch(args, processes: int, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        __file__,
        "--worker",
        "--out",
        str(out),
    ]
    for name in (
        "device",
        "backbone",
        "channels",
        "image_size",
        "classes",
        "meta_batch",
        "batch_size",
        "steps",
        "warmup",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="Processes to compare with one [2].")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process) [cpu].")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--classes", type=int, default=64, help="Pretraining classes [64].")
    parser.add_argument("--meta-batch", type=int, default=4, help="Global tasks per meta-step [4].")
    parser.add_argument("--batch-size", type=int, default=64, help="Global pretraining batch [64].")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps of each phase [10].")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for name in ("meta_batch", "batch_size"):
        if getattr(args, name) % args.nproc:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be a multiple of --nproc {args.nproc}")
    with tempfile.TemporaryDirectory() as folder:
        runs = [_launch(args, processes, Path(folder) / f"{processes}.json") for processes in (1, args.nproc)]
    print(
        f"\n{args.backbone} {args.channels}x{args.image_size}px on {args.device}, 1 thread per process, global "
        f"meta-batch {args.meta_batch} tasks, pretraining batch {args.batch_size}, {args.steps} timed steps"
    )
    print(f"{'phase':<20}{'processes':>10}{'throughput':>12}{'speed-up':>10}{'efficiency':>12}")
    for phase in ("meta-train tasks/s", "pretrain images/s"):
        for run in runs:
            speed_up = run[phase] / runs[0][phase]
            print(
                f"{phase:<20}{run['processes']:>10}{run[phase]:>12.1f}{speed_up:>10.2f}"
                f"{speed_up / run['processes']:>12.0%}"
            )


if __name__ == "__main__":
    main()
