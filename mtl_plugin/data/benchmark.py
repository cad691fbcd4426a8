"""One entry point for every few-shot data set: :func:`get_benchmark`.

Example::

    from mtl_plugin.data import get_benchmark
    bench = get_benchmark("kanji", num_classes=30, instances=6)
    tasks = bench.taskset("test", ways=5, shots=1, queries=3, num_tasks=10, seed=0)
    x, y = tasks.sample()          # x: 20 x 1 x 28 x 28, y: 0..4
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import learn2learn as l2l

from mtl_plugin.data.cache import data_home
from mtl_plugin.data.images import ImageClassDataset, as_meta_dataset, drop_small_classes
from mtl_plugin.data.registry import dataset_spec, list_datasets
from mtl_plugin.data.transforms import eval_transform, train_transform
from mtl_plugin.errors import DataError, UsageError
from mtl_plugin.tasks import build_taskset, check_task_shape

__all__ = [
    "KNOWN_BENCHMARKS",
    "FewShotBenchmark",
    "benchmark_identity",
    "check_tasks",
    "data_root",
    "get_benchmark",
    "image_size_of",
]

# The built-in data sets (mtl_plugin.data.registry registers them); list_datasets() adds the user's.
KNOWN_BENCHMARKS = tuple(list_datasets())
MIN_IMAGE_SIZE = 8
# Far above any few-shot benchmark's (84 px; ImageNet models 224-518): larger is a typo or a damaged record,
# and resizing every image to it would exhaust memory first.
MAX_IMAGE_SIZE = 2048
# A split whose images, as float32 tensors, fit in this many bytes keeps them after their first
# read (kanji and Omniglot at 28 px: about 100 MB; mini-ImageNet at 84 px, 3 GB, decodes each time).
MEMO_BYTES = 1 << 29


@dataclass
class FewShotBenchmark:
    """Train/val/test ``MetaDataset``s of one data set, plus the train split under augmentation.

    Each split yields ``(C x H x W float tensor, label)`` with labels
    ``0..n-1`` within the split. ``train_augmented`` holds the same images and
    labels as ``train`` under the data set's pretraining augmentation.
    ``standard`` marks the published benchmarks (whose published numbers apply).
    ``settings`` holds what was asked of :func:`get_benchmark` that changes the
    data beyond its name and image size (seed, kanji options, ``min_per_class``).
    ``content`` is a checksum of the images where the loader has one (the generated
    kanji's; an image folder's, :func:`~mtl_plugin.data.folders.folder_content`), so that
    results cached, or runs resumed, for other images are not taken for these.

    Example::

        bench = get_benchmark("fc100", root="~/data/fc100")
        classifier = torch.nn.Linear(640, bench.num_train_classes)
        loader = torch.utils.data.DataLoader(bench.train_augmented, batch_size=128, shuffle=True)
    """

    name: str
    train: l2l.data.MetaDataset
    val: l2l.data.MetaDataset
    test: l2l.data.MetaDataset
    train_augmented: l2l.data.MetaDataset
    image_size: int
    channels: int
    standard: bool
    settings: dict = field(default_factory=dict)
    content: str = ""

    @property
    def num_train_classes(self) -> int:
        """Number of meta-training classes (the pretraining classifier's outputs)."""
        return len(self.train.labels)

    def split(self, split: str) -> l2l.data.MetaDataset:
        """The ``MetaDataset`` of ``"train"``, ``"val"`` (or learn2learn's ``"validation"``) or ``"test"``.

        Raises:
            UsageError: another split name.

        Example::

            validation = bench.split("validation")
        """
        split = "val" if split == "validation" else split
        if split not in ("train", "val", "test"):
            raise UsageError(f"unknown split {split!r}: use 'train', 'val' (or 'validation') or 'test'")
        return getattr(self, split)

    def taskset(
        self, split: str, ways: int, shots: int, queries: int, num_tasks: int = -1, seed: int = 0
    ) -> l2l.data.Taskset:
        """Seeded N-way K-shot Q-query tasks from one split (see :func:`mtl_plugin.tasks.build_taskset`).

        Args:
            split: ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
            ways: classes per task.
            shots: support images per class.
            queries: query images per class.
            num_tasks: tasks in the ``Taskset`` (-1: a new one at every sample).
            seed: fixes the tasks drawn.

        Returns:
            A learn2learn ``Taskset`` whose samples are ``(data, labels)``, each class's
            ``shots + queries`` images in a row.

        Raises:
            UsageError: an unknown split.
            ValueError: a class with fewer than ``shots + queries`` images, or fewer classes than ``ways``.

        Example::

            tasks = bench.taskset("test", ways=5, shots=1, queries=15, num_tasks=600, seed=0)
        """
        return build_taskset(self.split(split), ways, shots, queries, num_tasks=num_tasks, seed=seed)


def _fits_in_memory(images: int, channels: int, size: int) -> bool:
    return images * channels * size * size * 4 <= MEMO_BYTES


def data_root(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder :func:`get_benchmark` reads ``name`` from (kanji: generates it into): ``root``
    if given, else ``$MTL_DATA/<name>``; ``None`` for a data set that needs a root (``folder``)
    without one.

    Raises:
        UsageError: an unknown data set.
        DataError: ``root`` is a file.

    Example::

        check_not_input(out, {"--root": data_root("kanji")})   # an --out inside the cache is refused
    """
    spec = dataset_spec(name)
    if root is None:
        return None if spec.needs_root else data_home() / spec.name
    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"root {root} (--root) is a file, not a folder: pass the folder holding the data set's files")
    return folder


def image_size_of(name: str, image_size: int | None = None, option: str = "image_size") -> int:
    """The image side :func:`get_benchmark` gives ``name`` for ``image_size`` (``None``: its usual one).

    Cheap (no file is read), so command lines can check a backbone against it first.

    Args:
        name: the data set.
        image_size: the side asked for, or ``None``.
        option: the argument that gave ``image_size``, for the message (``mtl`` passes ``--image-size``).

    Raises:
        UsageError: an unknown data set, or ``image_size`` outside 8..:data:`MAX_IMAGE_SIZE` px.

    Example::

        image_size_of("mini-imagenet")   # 84
    """
    size = dataset_spec(name).recipe.native_size if image_size is None else int(image_size)
    if size < MIN_IMAGE_SIZE:
        raise UsageError(f"image size {size} px: use {option} {MIN_IMAGE_SIZE} or more")
    if size > MAX_IMAGE_SIZE:
        raise UsageError(f"image size {size} px: use {option} {MAX_IMAGE_SIZE} or less")
    return size


def benchmark_identity(benchmark: Any) -> dict:
    """What makes ``benchmark``'s training data what it is, for checkpoints to record and compare.

    Works on any object with a ``train`` split (one that is not a :class:`FewShotBenchmark`
    has no name and settings to record). The image shape is the model's to record.

    Example::

        benchmark_identity(get_benchmark("kanji", num_classes=30, instances=6))
        # {'name': 'kanji', 'settings': {'num_classes': 30, 'instances': 6, 'seed': 0},
        #  'train_classes': 18, 'content': '3f9c...'}
    """
    identity = {
        "name": getattr(benchmark, "name", None),
        "settings": getattr(benchmark, "settings", {}),
        "train_classes": len(benchmark.train.labels),
    }
    if getattr(benchmark, "content", ""):
        identity["content"] = benchmark.content
    return identity


def check_tasks(benchmark: Any, ways: int, samples_per_class: int, splits=("train", "val", "test")) -> None:
    """Check that every split in ``splits`` can give ``ways``-way tasks of ``samples_per_class``
    images per class (shots + queries), before any training starts.

    Raises:
        UsageError: naming the split, the number of classes or the smallest class.

    Example::

        check_tasks(bench, ways=5, samples_per_class=1 + 15, splits=("test",))
    """
    for split in splits:
        try:
            check_task_shape(getattr(benchmark, split), ways, samples_per_class)
        except ValueError as error:
            raise UsageError(f"the {split} split cannot give these tasks: {error}") from error


def _drop_small(dataset: ImageClassDataset, min_per_class: int, split: str, name: str) -> ImageClassDataset:
    counts = dataset.class_counts()
    small = [f"{n} ({c})" for n, c in zip(dataset.class_names, counts) if c < min_per_class]
    if small:
        shown = ", ".join(small[:10]) + (f" and {len(small) - 10} more" if len(small) > 10 else "")
        warnings.warn(
            f"{name} {split}: skipping {len(small)} classes with fewer than {min_per_class} images: {shown}",
            stacklevel=2,
        )
    return drop_small_classes(dataset, min_per_class)


def get_benchmark(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    data_seed: int = 0,
    min_per_class: int | None = None,
    **options,
) -> FewShotBenchmark:
    """Load a registered few-shot data set by name (:func:`~mtl_plugin.data.registry.list_datasets`).

    Images per class, the most a task can ask for (shots + queries): kanji 20 (its
    ``instances``), Omniglot 20, mini-ImageNet, FC100 and CIFAR-FS 600, tieredImageNet at
    least 732, folders what they hold (``dataset_spec(name).max_per_class``); :func:`check_tasks`
    (and every command) checks a task shape against them before training.

    Args:
        name: a registered name, in any case, with ``-``, ``_`` or nothing between its words
            (``miniimagenet`` is ``mini-imagenet``).
        root: the folder holding the data set's files (default ``$MTL_DATA/<name>``; nothing
            is downloaded); for kanji, the cache folder of the generated arrays.
        image_size: image side; default the data set's usual one (84 for mini/tiered-ImageNet
            and folders, 32 for CIFAR-FS/FC100, 28 for Omniglot and kanji).
        data_seed: part of the data set, as its name is: it fixes what the data set itself
            draws at random (the generated kanji and their class split, Omniglot's character
            split). Not a task seed: tasks are seeded where they are drawn
            (:meth:`FewShotBenchmark.taskset`, :func:`~mtl_plugin.data.get_tasksets`), so that
            every seed of an experiment sees the same classes in the same split.
        min_per_class: skip classes with fewer images (with a warning), e.g. ``shots + queries``;
            without it such a class raises an error when tasks are built.
        **options: for kanji, ``num_classes``, ``instances``, any other
            :class:`~mtl_plugin.data.kanji.KanjiConfig` field, ``cache_dir``, ``workers``,
            ``progress``; for Omniglot, ``rotations`` (default True); for a data set of yours,
            the options it was registered with.

    Returns:
        The :class:`FewShotBenchmark`: train/val/test ``MetaDataset``s and the augmented train split.

    Raises:
        UsageError: an unknown name or option, an image size below 8 px, ``folder`` (or another data
            set registered with ``needs_root``) without ``root``.
        MissingDataError: a file or folder of the data set is missing (also a ``FileNotFoundError``).
        DataError: a file is empty, truncated or not in the expected format.

    Example::

        bench = get_benchmark("mini-imagenet", root="~/data/mini-imagenet", image_size=80)
        bench = get_benchmark("kanji", num_classes=200, instances=20)
    """
    spec = dataset_spec(name)
    unknown = set(options) - spec.options
    if "seed" in unknown:
        raise UsageError(
            "get_benchmark takes no seed: data_seed= is the data set's own draw (its classes and split); "
            "seed the tasks where they are drawn, e.g. benchmark.taskset(..., seed=s)"
        )
    if unknown:
        raise UsageError(
            f"{spec.name}: unknown option(s) {sorted(unknown)}; accepted options: {sorted(spec.options) or 'none'}"
        )
    folder = data_root(spec.name, root)
    if folder is None:
        raise UsageError(f"the {spec.name!r} data set needs root= (mtl: --root), a folder with train/, val/ and test/")
    size = image_size_of(spec.name, image_size)
    loaded = spec.load(folder, image_size=size, data_seed=data_seed, **options)
    splits = loaded.by_name()
    if min_per_class is not None:
        splits = {s: _drop_small(d, min_per_class, s, spec.name) for s, d in splits.items()}
    recipe = spec.recipe
    test_tf = eval_transform(recipe, size)
    for dataset in splits.values():
        dataset.mode = recipe.mode
    splits = {
        s: d.with_transform(test_tf, memoise=_fits_in_memory(len(d), recipe.channels, size)) for s, d in splits.items()
    }
    # Without augmentation the pretraining reads the train split as it is (and shares its memo).
    augmented = (
        splits["train"]
        if recipe.augmentation == "none"
        else splits["train"].with_transform(train_transform(recipe, size))
    )
    settings = {k: v for k, v in options.items() if k not in spec.loading_options}
    if spec.seeded:
        # Recorded as "seed", the name earlier checkpoints and bench folders hold it under.
        settings["seed"] = data_seed
    if min_per_class is not None:
        settings["min_per_class"] = min_per_class
    return FewShotBenchmark(
        name=spec.name,
        train=as_meta_dataset(splits["train"]),
        val=as_meta_dataset(splits["val"]),
        test=as_meta_dataset(splits["test"]),
        train_augmented=as_meta_dataset(augmented),
        image_size=size,
        channels=recipe.channels,
        standard=spec.standard,
        settings=settings,
        content=loaded.content,
    )
