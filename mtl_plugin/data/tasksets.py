"""``get_tasksets`` shaped like learn2learn's ``l2l.vision.benchmarks.get_tasksets``, on our data sets.

A learn2learn script swaps its data line and keeps the rest:
``tasksets = get_tasksets("kanji", train_ways=5, train_samples=2, test_ways=5, test_samples=2)``.
The tasks are seeded (every run and every method sees the same ones); the seed draws tasks
only, never the data set's classes or their split, so :func:`~mtl_plugin.data.get_benchmark`
with the same ``data_seed`` (default 0) gives the classes a pretraining must stay within. The
number of images per class a task needs is checked against every split before anything trains.

Example::

    from mtl_plugin.data.tasksets import get_tasksets
    train_tasks, validation_tasks, test_tasks = get_tasksets("kanji", train_samples=2, test_samples=2)
    data, labels = train_tasks.sample()
"""

from __future__ import annotations

from learn2learn.vision.benchmarks import BenchmarkTasksets

from mtl_plugin.data.benchmark import check_tasks, get_benchmark
from mtl_plugin.errors import UsageError

__all__ = ["get_tasksets"]


def get_tasksets(
    name: str,
    train_ways: int = 5,
    train_samples: int = 10,
    test_ways: int = 5,
    test_samples: int = 10,
    num_tasks: int = -1,
    root: str | None = None,
    *,
    image_size: int | None = None,
    seed: int = 0,
    data_seed: int = 0,
    **options,
) -> BenchmarkTasksets:
    """Train, validation and test ``Taskset``s of a data set, as learn2learn's ``get_tasksets`` returns them.

    The first seven arguments are learn2learn's: ``*_samples`` counts the images per class of
    a task (support and query together, e.g. ``2 * shots`` in learn2learn's examples); the
    validation tasks take the test shape. ``root`` is where the data set's files are (nothing is
    downloaded; for ``kanji``, the cache folder).

    Args:
        name: a data set :func:`~mtl_plugin.data.get_benchmark` knows (``kanji``, ``mini-imagenet``, ...).
        train_ways: classes per training task.
        train_samples: images per class of a training task.
        test_ways: classes per validation and test task.
        test_samples: images per class of a validation and test task.
        num_tasks: tasks per ``Taskset`` (-1: a new task at every sample).
        root: the data set's folder.
        image_size: image side; ``None``: the data set's usual one.
        seed: fixes the tasks drawn, and nothing else.
        data_seed: the data set's own draw (see :func:`~mtl_plugin.data.get_benchmark`); pretrain
            with the same one.
        **options: passed to :func:`~mtl_plugin.data.get_benchmark` (e.g. kanji's ``num_classes``).

    Returns:
        ``BenchmarkTasksets(train, validation, test)``, learn2learn's named tuple.

    Raises:
        UsageError: an unknown data set or option, fewer than 2 ways or 1 sample, or a task
            shape a split cannot give (the message names the split and its smallest class).
        MissingDataError, DataError: the data set's files are missing or unreadable.

    Example::

        tasksets = get_tasksets("kanji", train_ways=5, train_samples=2, test_ways=5, test_samples=2)
        data, labels = tasksets.train.sample()     # 10 images, labels 0..4
    """
    for option, value, least in (
        ("train_ways", train_ways, 2),
        ("test_ways", test_ways, 2),
        ("train_samples", train_samples, 1),
        ("test_samples", test_samples, 1),
    ):
        if value < least:
            raise UsageError(f"{option}={value}: use {least} or more")
    benchmark = get_benchmark(name, root=root, image_size=image_size, data_seed=data_seed, **options)
    check_tasks(benchmark, train_ways, train_samples, splits=("train",))
    check_tasks(benchmark, test_ways, test_samples, splits=("val", "test"))
    # queries=0: learn2learn's *_samples already counts support and query images together.
    return BenchmarkTasksets(
        benchmark.taskset("train", train_ways, train_samples, 0, num_tasks=num_tasks, seed=seed),
        benchmark.taskset("val", test_ways, test_samples, 0, num_tasks=num_tasks, seed=seed + 1),
        benchmark.taskset("test", test_ways, test_samples, 0, num_tasks=num_tasks, seed=seed + 2),
    )
