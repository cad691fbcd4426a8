#!/usr/bin/env python3
"""Prototypical Networks on kanji in the structure of learn2learn's examples/vision/protonet_miniimagenet.py,
with MTL dropped in.

The lines a user of learn2learn's script changes end in ``# MTL`` (3 lines: pretrain a Conv4
on the meta-train classes, about 5 minutes on 2 cores, and freeze it under an SS adapter in
place of ``Convnet()``; the optimiser line stays, since the frozen weights get no gradient and
only Φ learns) or ``# HT`` (4 lines: the hard-task meta-batch, an episode of the failures after
each normal one).
``fast_adapt`` keeps its signature and its ``(loss, accuracy)``. Without the marked lines, and
with ``model = Convnet()`` trained whole, this is learn2learn's ProtoNets on kanji.

    python examples/protonet_kanji.py --max-epoch 20 --hard-tasks
"""

import argparse

import torch
import torch.nn.functional as F

import mtl_plugin  # before learn2learn: from a source checkout this keeps gym's notice off stderr
from mtl_plugin import PretrainConfig, SSAdapter, get_benchmark, pretrain  # MTL


def pairwise_distances_logits(a, b):
    return -((a.unsqueeze(1) - b.unsqueeze(0)) ** 2).sum(dim=2)


def accuracy(predictions, targets):
    return (predictions.argmax(dim=1) == targets).float().mean()


def fast_adapt(model, batch, ways, shot, query_num, metric=None, device=None):
    if metric is None:
        metric = pairwise_distances_logits
    if device is None:
        device = next(model.parameters()).device
    data, labels = batch
    data, labels = data.to(device), labels.to(device)

    # Sorted by label, each class's shot + query_num images come in a row: the first shot are its support.
    sort = torch.sort(labels)
    data, labels = data[sort.indices], labels[sort.indices]
    embeddings = model(data)
    support_indices = torch.zeros(data.size(0), dtype=torch.bool)
    support_indices[(torch.arange(ways) * (shot + query_num)).unsqueeze(1) + torch.arange(shot)] = True
    support = embeddings[support_indices].reshape(ways, shot, -1).mean(dim=1)
    query = embeddings[~support_indices]
    labels = labels[~support_indices].long()

    logits = metric(query, support)
    mtl_plugin.record_task(batch, logits, labels)  # HT: a normal episode's failures make the next one
    return F.cross_entropy(logits, labels), accuracy(logits, labels)


def main(
    max_epoch=20,
    episodes=100,
    shot=1,
    train_way=5,
    train_query=15,
    test_way=5,
    test_shot=1,
    test_query=15,
    valid_tasks=200,
    test_tasks=2000,
    hard_tasks=False,  # HT: True draws an episode of the failures after each normal one
    cuda=torch.cuda.is_available(),
    seed=43,
):
    torch.manual_seed(seed)
    device = torch.device("cuda" if cuda else "cpu")

    tasksets = mtl_plugin.get_tasksets(
        "kanji",
        train_ways=train_way,
        train_samples=shot + train_query,
        test_ways=test_way,
        test_samples=test_shot + test_query,
        seed=seed,
    )
    hard = mtl_plugin.HardTaskMetaBatch.from_taskset(tasksets.train, k=1, seed=seed)  # HT

    # The seed draws tasks only: get_benchmark("kanji") holds the very classes tasksets.train draws from.
    backbone = pretrain(get_benchmark("kanji"), PretrainConfig.quick(), "runs/pretrain-kanji", device)  # MTL
    model = SSAdapter(backbone)  # MTL: in place of Convnet(); the backbone's weights frozen, Φ1 = 1, Φ2 = 0
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)

    for epoch in range(1, max_epoch + 1):
        model.train()
        loss_ctr = 0
        n_loss = 0.0
        n_acc = 0.0
        for i in range(episodes):
            batch = hard.sample() if hard_tasks else tasksets.train.sample()  # HT
            loss, acc = fast_adapt(
                model, batch, train_way, shot, train_query, metric=pairwise_distances_logits, device=device
            )
            loss_ctr += 1
            n_loss += loss.item()
            n_acc += acc.item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        lr_scheduler.step()
        print(f"epoch {epoch}, train, loss={n_loss / loss_ctr:.4f} acc={n_acc / loss_ctr:.4f}")

        model.eval()
        loss_ctr = 0
        n_loss = 0.0
        n_acc = 0.0
        with torch.no_grad():
            for i in range(valid_tasks):
                loss, acc = fast_adapt(
                    model,
                    tasksets.validation.sample(),
                    test_way,
                    test_shot,
                    test_query,
                    metric=pairwise_distances_logits,
                    device=device,
                )
                loss_ctr += 1
                n_loss += loss.item()
                n_acc += acc.item()
        print(f"epoch {epoch}, val, loss={n_loss / loss_ctr:.4f} acc={n_acc / loss_ctr:.4f}")

    n_acc = 0.0
    with torch.no_grad():
        for i in range(test_tasks):
            _, acc = fast_adapt(
                model,
                tasksets.test.sample(),
                test_way,
                test_shot,
                test_query,
                metric=pairwise_distances_logits,
                device=device,
            )
            n_acc += acc.item()
    print(f"test, acc={n_acc / test_tasks:.4f} over {test_tasks} tasks")
    return n_acc / test_tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epoch", type=int, default=20)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--hard-tasks", action="store_true")
    arguments = parser.parse_args()
    main(max_epoch=arguments.max_epoch, shot=arguments.shot, test_shot=arguments.shot, hard_tasks=arguments.hard_tasks)
