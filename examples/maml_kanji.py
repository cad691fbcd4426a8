#!/usr/bin/env python3
"""MAML, written the way learn2learn's examples/vision/maml_miniimagenet.py is, with MTL dropped in.

Lines marked ``# MTL`` (7, and the ``pretraining`` setting) are what the plugin changes: pretrain a backbone on all meta-train
classes, freeze it under an SS adapter, let MAML adapt only a zero-started head, and
meta-learn Φ with the head's initialisation. Lines marked ``# HT`` (4) add the hard-task
meta-batch: after the normal tasks of an iteration, tasks made of their failure classes.
Without the marked lines (``model = l2l.vision.models.CNN4(...)`` adapted whole) this is
plain MAML.

    python examples/maml_kanji.py --iterations 1000 --hard-tasks
"""
import argparse

import learn2learn as l2l
import torch
from torch import nn

import mtl_plugin
from mtl_plugin import PretrainConfig, SSAdapter, get_benchmark, new_head, pretrain  # MTL


def accuracy(predictions, targets):
    return (predictions.argmax(dim=1) == targets).float().mean()


def fast_adapt(batch, learner, features, loss, adaptation_steps, shots, ways, device):
    data, labels = batch
    data, labels = features(data.to(device)), labels.to(device)  # MTL: the frozen backbone runs once
    # Each class has 2 * shots images in a row: every other one adapts, the rest evaluate.
    adaptation = torch.zeros(data.size(0), dtype=torch.bool)
    adaptation[torch.arange(shots * ways) * 2] = True
    for _ in range(adaptation_steps):
        learner.adapt(loss(learner(data[adaptation]), labels[adaptation]))
    predictions, targets = learner(data[~adaptation]), labels[~adaptation]
    return loss(predictions, targets), accuracy(predictions, targets), predictions, targets


def main(ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=32, adaptation_steps=1, iterations=1000,
         test_tasks=600, hard_tasks=False, pretraining=PretrainConfig("conv4", epochs=20), seed=42,
         out="runs/maml-kanji", data=None, device="cpu"):
    torch.manual_seed(seed)
    device, data = torch.device(device), data or {}
    tasksets = mtl_plugin.get_tasksets("kanji", train_ways=ways, train_samples=2 * shots, test_ways=ways,
                                       test_samples=2 * shots, seed=seed, **data)
    backbone = pretrain(get_benchmark("kanji", **data), pretraining, out, device)  # MTL: all meta-train classes
    features = SSAdapter(backbone).to(device)  # MTL: Φ1 = 1, Φ2 = 0; the backbone's weights frozen
    model = new_head(features, ways)  # MTL: adapted by MAML instead of a whole CNN4
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    optimizer = torch.optim.Adam([*maml.parameters(), *features.ss_parameters()], meta_lr)  # MTL
    loss = nn.CrossEntropyLoss(reduction="mean")
    sampler = mtl_plugin.HardTaskMetaBatch.from_taskset(tasksets.train, k=meta_batch_size // 2, seed=seed)  # HT

    for iteration in range(iterations):
        optimizer.zero_grad()
        meta_train_error = meta_train_accuracy = 0.0
        tasks = sampler.sample() if hard_tasks else [tasksets.train.sample() for _ in range(meta_batch_size)]  # HT
        for batch in tasks:
            learner = maml.clone()
            error, acc, predictions, targets = fast_adapt(batch, learner, features, loss, adaptation_steps, shots,
                                                          ways, device)
            error.backward()
            if hard_tasks:  # HT
                batch.record(predictions, targets)  # HT: failure classes feed the hard tasks
            meta_train_error += error.item()
            meta_train_accuracy += acc.item()
        for p in [*maml.parameters(), *features.ss_parameters()]:  # MTL: average SS's meta-gradient too
            p.grad.data.mul_(1.0 / meta_batch_size)
        optimizer.step()
        if iteration % 100 == 0:
            print(f"iteration {iteration}: meta-train error {meta_train_error / meta_batch_size:.3f}, "
                  f"accuracy {meta_train_accuracy / meta_batch_size:.3f}")

    meta_test_accuracy = 0.0
    for _ in range(test_tasks):
        learner = maml.clone()
        meta_test_accuracy += fast_adapt(tasksets.test.sample(), learner, features, loss, adaptation_steps, shots,
                                         ways, device)[1].item()
    print(f"meta-test accuracy {meta_test_accuracy / test_tasks:.3f} over {test_tasks} tasks")
    return meta_test_accuracy / test_tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--hard-tasks", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    main(shots=arguments.shots, iterations=arguments.iterations, hard_tasks=arguments.hard_tasks,
         device=arguments.device)
