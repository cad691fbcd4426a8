#!/usr/bin/env python3
"""MAML on kanji in the structure of learn2learn's examples/vision/maml_omniglot.py, with MTL dropped in.

The lines a user of learn2learn's script changes end in ``# MTL`` (5 lines: pretrain a Conv4
on the meta-train classes, about 5 minutes on 2 cores, put an SS head on it in place of
``OmniglotFC``, let the outer optimiser learn Φ) or ``# HT`` (4 lines: the hard-task
meta-batch). ``fast_adapt`` keeps its signature and its ``(error, accuracy)``. Without the
marked lines, and with ``model = l2l.vision.models.OmniglotFC(28 ** 2, ways)``, this is
learn2learn's MAML with its data line swapped for kanji.

    python examples/maml_kanji.py --iterations 1000 --hard-tasks
"""

import argparse

import learn2learn as l2l
import torch
from torch import nn, optim

import mtl_plugin  # before learn2learn: from a source checkout this keeps gym's notice off stderr
from mtl_plugin import PretrainConfig, SSHead, get_benchmark, pretrain  # MTL


def accuracy(predictions, targets):
    return (predictions.argmax(dim=1) == targets).float().mean()


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device):
    data, labels = batch
    data, labels = data.to(device), labels.to(device)

    # Each class's 2 * shots images come in a row: every other one adapts, the rest evaluate.
    adaptation_indices = torch.zeros(data.size(0), dtype=torch.bool)
    adaptation_indices[torch.arange(shots * ways) * 2] = True
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[~adaptation_indices], labels[~adaptation_indices]

    for step in range(adaptation_steps):
        learner.adapt(loss(learner(adaptation_data), adaptation_labels))

    predictions = learner(evaluation_data)
    mtl_plugin.record_task(batch, predictions, evaluation_labels)  # HT: a normal task's failures make hard tasks
    return loss(predictions, evaluation_labels), accuracy(predictions, evaluation_labels)


def main(
    ways=5,
    shots=1,
    meta_lr=0.003,
    fast_lr=0.5,
    meta_batch_size=32,
    adaptation_steps=1,
    num_iterations=1000,
    test_tasks=600,
    hard_tasks=False,  # HT: True draws the hard-task meta-batch
    cuda=torch.cuda.is_available(),
    seed=42,
):
    torch.manual_seed(seed)
    device = torch.device("cuda" if cuda else "cpu")

    tasksets = mtl_plugin.get_tasksets(
        "kanji", train_ways=ways, train_samples=2 * shots, test_ways=ways, test_samples=2 * shots, seed=seed
    )
    # An even meta_batch_size of tasks a step: half of them fresh, half made of their failures.
    hard = mtl_plugin.HardTaskMetaBatch.from_taskset(tasksets.train, k=meta_batch_size // 2, seed=seed)  # HT

    # The seed draws tasks only: get_benchmark("kanji") holds the very classes tasksets.train draws from.
    backbone = pretrain(get_benchmark("kanji"), PretrainConfig.quick(), "runs/pretrain-kanji", device)  # MTL
    model = SSHead(backbone, ways)  # MTL: in place of OmniglotFC; MAML adapts its head, Φ is meta-learned
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam([*maml.parameters(), *model.ss_parameters()], meta_lr)  # MTL
    loss = nn.CrossEntropyLoss(reduction="mean")

    for iteration in range(num_iterations):
        opt.zero_grad()
        meta_train_error = 0.0
        meta_train_accuracy = 0.0
        meta_valid_error = 0.0
        meta_valid_accuracy = 0.0
        for task in range(meta_batch_size):
            learner = maml.clone()
            batch = hard.sample() if hard_tasks else tasksets.train.sample()  # HT
            evaluation_error, evaluation_accuracy = fast_adapt(
                batch, learner, loss, adaptation_steps, shots, ways, device
            )
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()

            learner = maml.clone()
            batch = tasksets.validation.sample()
            evaluation_error, evaluation_accuracy = fast_adapt(
                batch, learner, loss, adaptation_steps, shots, ways, device
            )
            meta_valid_error += evaluation_error.item()
            meta_valid_accuracy += evaluation_accuracy.item()

        if iteration % 10 == 0:
            print(
                f"iteration {iteration}: meta-train error {meta_train_error / meta_batch_size:.3f}, "
                f"accuracy {meta_train_accuracy / meta_batch_size:.3f}; meta-valid error "
                f"{meta_valid_error / meta_batch_size:.3f}, accuracy {meta_valid_accuracy / meta_batch_size:.3f}"
            )

        # The losses were summed over the meta-batch: average their gradients, Φ's too.
        for p in [*maml.parameters(), *model.ss_parameters()]:  # MTL
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()

    meta_test_error = 0.0
    meta_test_accuracy = 0.0
    for task in range(test_tasks):
        learner = maml.clone()
        batch = tasksets.test.sample()
        evaluation_error, evaluation_accuracy = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device)
        meta_test_error += evaluation_error.item()
        meta_test_accuracy += evaluation_accuracy.item()
    print(
        f"meta-test error {meta_test_error / test_tasks:.3f}, accuracy {meta_test_accuracy / test_tasks:.3f} "
        f"over {test_tasks} tasks"
    )
    return meta_test_accuracy / test_tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--hard-tasks", action="store_true")
    arguments = parser.parse_args()
    main(shots=arguments.shots, num_iterations=arguments.iterations, hard_tasks=arguments.hard_tasks)
