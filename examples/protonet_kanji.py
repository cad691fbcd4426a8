#!/usr/bin/env python3
"""Prototypical Networks, written the way learn2learn's examples/vision/protonet_miniimagenet.py is,
with MTL dropped in.

Lines marked ``# MTL`` (4, and the ``pretraining`` setting) are what the plugin changes: pretrain the embedding on all meta-train
classes, freeze it under an SS adapter and learn only Φ with the episodic prototype loss.
Lines marked ``# HT`` (4) add the hard-task meta-batch: after each normal episode, an episode
made of the classes it failed most. Without the marked lines (and ``model = Convnet()``
trained whole) this is plain ProtoNets.

    python examples/protonet_kanji.py --iterations 1000 --hard-tasks
"""
import argparse

import torch
from torch import nn

import mtl_plugin
from mtl_plugin import PretrainConfig, SSAdapter, get_benchmark, pretrain  # MTL


def pairwise_distances_logits(a, b):
    return -((a.unsqueeze(1) - b.unsqueeze(0)) ** 2).sum(dim=2)


def accuracy(predictions, targets):
    return (predictions.argmax(dim=1) == targets).float().mean()


def fast_adapt(model, batch, ways, shots, queries, device):
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    # Sort by label, so that each class's shots + queries images are in a row.
    order = torch.sort(labels).indices
    embeddings, labels = model(data[order]), labels[order]
    support = torch.zeros(embeddings.size(0), dtype=torch.bool)
    support[(torch.arange(ways) * (shots + queries)).unsqueeze(1) + torch.arange(shots)] = True
    prototypes = embeddings[support].reshape(ways, shots, -1).mean(dim=1)
    logits = pairwise_distances_logits(embeddings[~support], prototypes)
    targets = labels[~support]
    return nn.functional.cross_entropy(logits, targets), accuracy(logits, targets), logits, targets


def main(ways=5, shots=1, queries=15, lr=0.001, iterations=1000, test_tasks=600, hard_tasks=False,
         pretraining=PretrainConfig("conv4", epochs=20), seed=42, out="runs/protonet-kanji", data=None, device="cpu"):
    torch.manual_seed(seed)
    device, data = torch.device(device), data or {}
    tasksets = mtl_plugin.get_tasksets("kanji", train_ways=ways, train_samples=shots + queries, test_ways=ways,
                                       test_samples=shots + queries, seed=seed, **data)
    backbone = pretrain(get_benchmark("kanji", **data), pretraining, out, device)  # MTL: all meta-train classes
    model = SSAdapter(backbone).to(device)  # MTL: replaces the Convnet that plain ProtoNets trains
    optimizer = torch.optim.Adam(model.ss_parameters(), lr=lr)  # MTL: only Φ learns
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(iterations // 10, 1), gamma=0.5)
    sampler = mtl_plugin.HardTaskMetaBatch.from_taskset(tasksets.train, k=1, seed=seed)  # HT

    for iteration in range(iterations):
        model.train()
        for batch in sampler.sample() if hard_tasks else [tasksets.train.sample()]:  # HT
            loss, acc, logits, targets = fast_adapt(model, batch, ways, shots, queries, device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if hard_tasks:  # HT
                batch.record(logits, targets)  # HT: failure classes feed the next episode
        scheduler.step()
        if iteration % 100 == 0:
            print(f"iteration {iteration}: loss {loss.item():.3f}, accuracy {acc.item():.3f}")

    model.eval()
    with torch.no_grad():
        test_accuracy = sum(fast_adapt(model, tasksets.test.sample(), ways, shots, queries, device)[1].item()
                            for _ in range(test_tasks))
    print(f"meta-test accuracy {test_accuracy / test_tasks:.3f} over {test_tasks} tasks")
    return test_accuracy / test_tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--hard-tasks", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    main(shots=arguments.shots, iterations=arguments.iterations, hard_tasks=arguments.hard_tasks,
         device=arguments.device)
