import pytest
import torch
from learn2learn.vision.benchmarks import BenchmarkTasksets

from mtl_plugin import get_benchmark, get_tasksets
from mtl_plugin.errors import UsageError

TINY = dict(num_classes=30, instances=6)


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))


def test_get_tasksets_is_shaped_like_learn2learns():
    tasksets = get_tasksets("kanji", train_ways=5, train_samples=2, test_ways=3, test_samples=4, **TINY)
    assert isinstance(tasksets, BenchmarkTasksets)
    train, validation, test = tasksets
    data, labels = train.sample()
    assert data.shape == (10, 1, 28, 28) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for tasks in (validation, test):
        data, labels = tasks.sample()
        assert data.shape[0] == 12 and set(labels.tolist()) == {0, 1, 2}
    # Seeded: the same call gives the same tasks.
    again = get_tasksets("kanji", train_ways=5, train_samples=2, test_ways=3, test_samples=4, **TINY)
    assert torch.equal(
        again.train.sample()[0],
        get_tasksets("kanji", train_ways=5, train_samples=2, test_ways=3, test_samples=4, **TINY).train.sample()[0],
    )


def test_tasks_a_split_cannot_give_are_refused_before_training():
    with pytest.raises(UsageError, match="the val split cannot give these tasks"):
        get_tasksets("kanji", train_samples=2, test_samples=7, **TINY)  # 6 images per class
    with pytest.raises(UsageError, match="train_ways=1"):
        get_tasksets("kanji", train_ways=1, **TINY)


def test_learn2learns_split_name_is_accepted():
    bench = get_benchmark("kanji", **TINY)
    assert bench.split("validation") is bench.val
    with pytest.raises(UsageError, match="'validation'"):
        bench.split("dev")


def test_our_task_transforms_take_learn2learns_arguments_plus_a_seed():
    import inspect

    import learn2learn as l2l

    from mtl_plugin import tasks

    for name in ("NWays", "KShots", "RemapLabels"):
        theirs = inspect.signature(getattr(l2l.data.transforms, name).__init__).parameters
        ours = inspect.signature(getattr(tasks, name).__init__).parameters
        assert [(p.name, p.default) for p in theirs.values()] == [
            (p.name, p.default) for p in ours.values() if p.kind is not p.KEYWORD_ONLY
        ]
        assert ours["seed"].kind is inspect.Parameter.KEYWORD_ONLY

    md = get_benchmark("kanji", **TINY).train
    with_replacement = tasks.KShots(md, k=10, replacement=True, seed=0)(tasks.NWays(md, n=2, seed=0)(None))
    assert len(with_replacement) == 20  # 10 per class although a class has 6 images
    in_order = l2l.data.Taskset(
        md,
        [
            tasks.NWays(md, n=3, seed=1),
            tasks.KShots(md, k=1, seed=1),
            l2l.data.transforms.LoadData(md),
            tasks.RemapLabels(md, shuffle=False),
        ],
    )
    assert in_order.sample()[1].tolist() == [0, 1, 2]
