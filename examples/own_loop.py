#!/usr/bin/env python3
"""Meta-transfer learning on kanji driven by your own learn2learn-style loop and your own optimiser.

``MetaTransferLearner`` is the method, as learn2learn's ``MAML`` is: the SS adapter Φ on a
frozen pretrained Conv4 and the head's meta-learned initialisation θ. ``task_loss`` adapts
θ on a task's support set and returns the query loss, differentiable in Φ and θ; the loop,
the optimiser and any schedule are this script's. ``parameter_groups()`` gives Φ and θ at
the paper's learning rates; any torch optimiser takes them.

    python examples/own_loop.py --iterations 1000
"""

import argparse

import torch

import mtl_plugin  # before learn2learn: from a source checkout this keeps gym's notice off stderr
from mtl_plugin import (
    MetaTrainConfig,
    MetaTransferLearner,
    PretrainConfig,
    SSAdapter,
    get_benchmark,
    pretrain,
    split_support_query,
)


def main(
    ways=5,
    shots=1,
    meta_batch_size=2,
    num_iterations=1000,
    test_tasks=600,
    pretraining=PretrainConfig.quick(),
    pretrain_dir="runs/pretrain-kanji",  # Conv4, ~5 min on 2 cores
    data=None,
    cuda=torch.cuda.is_available(),
    seed=42,
):
    torch.manual_seed(seed)
    device = torch.device("cuda" if cuda else "cpu")
    data = data or {}  # kanji's size (num_classes, instances): the tests take a small one
    tasksets = mtl_plugin.get_tasksets(
        "kanji", train_ways=ways, train_samples=2 * shots, test_ways=ways, test_samples=2 * shots, seed=seed, **data
    )

    backbone = pretrain(get_benchmark("kanji", **data), pretraining, pretrain_dir, device)
    learner = MetaTransferLearner(SSAdapter(backbone), ways, MetaTrainConfig(ways=ways, shots=shots)).to(device)
    optimizer = torch.optim.Adam(learner.parameter_groups())  # Φ at encoder_lr, θ at head_lr

    for iteration in range(num_iterations):
        optimizer.zero_grad()
        meta_train_error = 0.0
        for task in range(meta_batch_size):
            (support_x, support_y), (query_x, query_y) = split_support_query(*tasksets.train.sample(), shots)
            evaluation_error, _ = learner.task_loss(support_x, support_y, query_x, query_y)
            # The mean over the meta-batch: each task's graph is freed as soon as it is backpropagated.
            (evaluation_error / meta_batch_size).backward()
            meta_train_error += evaluation_error.item()
        optimizer.step()
        if iteration % 10 == 0:
            print(f"iteration {iteration}: meta-train error {meta_train_error / meta_batch_size:.3f}")

    meta_test_accuracy = 0.0
    for task in range(test_tasks):
        (support_x, support_y), (query_x, query_y) = split_support_query(*tasksets.test.sample(), shots)
        predictions = learner.predict(support_x, support_y, query_x, ways).argmax(dim=1).cpu()
        meta_test_accuracy += (predictions == query_y).float().mean().item()
    print(f"meta-test accuracy {meta_test_accuracy / test_tasks:.3f} over {test_tasks} tasks")
    return meta_test_accuracy / test_tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=1)
    arguments = parser.parse_args()
    main(shots=arguments.shots, num_iterations=arguments.iterations)
