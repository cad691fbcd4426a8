"""How often each class appears in hard tasks versus normal ones while a small model trains.

A prototypical network with a linear embedding meta-trains on synthetic
Gaussian classes whose noise grows with the class id, so the last classes are
the hardest. Every meta-batch holds ``k`` normal and ``k`` hard tasks
(:class:`mtl_plugin.HardTaskMetaBatch`). The table shows, per class, its noise,
its share of normal and of hard tasks and its mean query accuracy in the normal
tasks; the last line is the correlation between a class's error rate and its
hard-task share, which is high when the sampler concentrates on what the model
gets wrong, and the mean query accuracy of the normal against the hard tasks
(before each meta-update), which must be lower for the hard ones. The tracker
keeps its default history of failures (decay 0.9 per meta-batch) and gets
logits, so ties are broken by margin. Runs in well under a minute on 2 CPU cores.

    .venv/bin/python benchmarks/hard_tasks_demo.py [--meta-batches 300] [--mode resample]
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import click
import learn2learn as l2l
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from mtl_plugin.hard_tasks import ClassAccuracyTracker, HardTaskMetaBatch, HardTaskTransform
from mtl_plugin.tasks import KShots, RemapLabels, build_taskset, split_support_query

WAYS, SHOTS, QUERIES = 5, 1, 10


class NoisyClusters(Dataset):
    """``per_class`` points around a random centre per class; class c's noise is ``noise[c]``."""

    def __init__(self, noise: list, per_class: int, dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(len(noise), dim, generator=generator)
        labels = torch.arange(len(noise)).repeat_interleave(per_class)
        scale = torch.tensor(noise)[labels].unsqueeze(1)
        self.x = centres[labels] + scale * torch.randn(len(labels), dim, generator=generator)
        self.y = labels.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def prototype_logits(embed: torch.nn.Module, task) -> tuple[torch.Tensor, torch.Tensor]:
    (xs, ys), (xq, yq) = split_support_query(task.data, task.labels, SHOTS)
    support, query = embed(xs), embed(xq)
    prototypes = torch.stack([support[ys == j].mean(0) for j in range(len(task.classes))])
    return -(torch.cdist(query, prototypes) ** 2), yq


@click.command()
@click.option("--classes", default=20, show_default=True, help="synthetic classes; noise rises linearly")
@click.option("--meta-batches", default=300, show_default=True)
@click.option("--k", default=4, show_default=True, help="normal (and hard) tasks per meta-batch")
@click.option("--mode", type=click.Choice(["resample", "reuse"]), default="resample", show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(classes: int, meta_batches: int, k: int, mode: str, seed: int) -> None:
    # Tensors of a few dozen rows: extra threads only add synchronisation, which dominates on a busy machine.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    noise = [0.4 + 1.4 * c / (classes - 1) for c in range(classes)]
    meta_dataset = l2l.data.MetaDataset(NoisyClusters(noise, per_class=40, dim=16, seed=seed))
    tracker = ClassAccuracyTracker(meta_dataset, seed=seed)
    hard_tasks = l2l.data.Taskset(
        meta_dataset,
        [
            HardTaskTransform(meta_dataset, n=WAYS, tracker=tracker, mode=mode, seed=seed),
            KShots(meta_dataset, k=SHOTS + QUERIES, seed=seed),
            l2l.data.transforms.LoadData(meta_dataset),
            RemapLabels(meta_dataset, seed=seed),
        ],
    )
    normal_tasks = build_taskset(meta_dataset, WAYS, SHOTS, QUERIES, seed=seed)
    sampler = HardTaskMetaBatch(normal_tasks, hard_tasks, k=k, seed=seed)
    embed = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(embed.parameters(), lr=1e-2)

    in_normal, in_hard, accuracy_sum = Counter(), Counter(), Counter()
    task_accuracy = {False: [], True: []}
    start = time.perf_counter()
    for meta_batch in tqdm(
        itertools.islice(sampler, meta_batches), total=meta_batches, desc="meta-batches", mininterval=2
    ):
        losses = []
        for task in meta_batch:
            logits, yq = prototype_logits(embed, task)
            losses.append(F.cross_entropy(logits, yq))
            task_accuracy[task.hard].append((logits.argmax(1) == yq).float().mean().item())
            if task.hard:
                in_hard.update(task.classes)
            else:
                in_normal.update(task.classes)
                accuracy_sum.update(tracker.record(task.classes, logits, yq, indices=task.indices).accuracies)
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()
    seconds = time.perf_counter() - start

    table = pd.DataFrame(
        {
            "class": range(classes),
            "noise": [round(s, 2) for s in noise],
            "share of normal tasks": [in_normal[c] / (k * meta_batches) for c in range(classes)],
            "share of hard tasks": [in_hard[c] / (k * meta_batches) for c in range(classes)],
            "mean accuracy (normal tasks)": [accuracy_sum[c] / max(in_normal[c], 1) for c in range(classes)],
        }
    )
    print(table.round(3).to_string(index=False))
    error_rate = 1 - table["mean accuracy (normal tasks)"]
    print(
        f"\n{meta_batches} meta-batches of {k} normal + {k} hard {WAYS}-way {SHOTS}-shot tasks ({mode}) "
        f"in {seconds:.1f} s"
    )
    print(f"correlation(error rate, share of hard tasks) = {error_rate.corr(table['share of hard tasks']):.3f}")
    print(f"correlation(error rate, share of normal tasks) = {error_rate.corr(table['share of normal tasks']):.3f}")
    normal, hard = (sum(task_accuracy[h]) / len(task_accuracy[h]) for h in (False, True))
    print(f"mean query accuracy: normal tasks {normal:.3f}, hard tasks {hard:.3f}")


if __name__ == "__main__":
    main()
