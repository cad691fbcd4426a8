"""Data sets by name, as backbones are: :func:`register_dataset`, :func:`dataset_spec`.

One entry holds every fact about a data set that the package asks for: how its three splits are
read, its image recipe (channels, usual size, normalisation, pretraining augmentation), the most
images a class offers a task, whether it is a published benchmark (so that the bench prints the
published figures, which :mod:`mtl_plugin.bench.published` keeps by this name, beside ours),
whether its contents depend on ``get_benchmark``'s ``data_seed``, and whether its class names
identify a class whatever its images (the leak check's evidence). The built-in data sets register
below; a user's registers the same way and is then loaded by :func:`~mtl_plugin.get_benchmark`,
``run_bench`` and everything that takes a data set's name.

Example::

    from mtl_plugin.data import ImageRecipe, Splits, get_benchmark, image_folder_split, register_dataset

    @register_dataset("glyphs", recipe=ImageRecipe(native_size=32, channels=1), needs_root=True)
    def glyphs(root, *, image_size, data_seed):
        return Splits(*(image_folder_split(root, s) for s in ("train", "val", "test")))

    bench = get_benchmark("glyphs", root="~/data/glyphs")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torchvision.transforms import InterpolationMode

from mtl_plugin.data.folders import folder_content, image_folder_split
from mtl_plugin.data.images import ArraySource, ImageClassDataset
from mtl_plugin.data.kanji import KanjiConfig, load_kanji
from mtl_plugin.data.standard import read_split
from mtl_plugin.data.transforms import CIFAR_STATS, IMAGENET_STATS, ImageRecipe
from mtl_plugin.errors import UsageError

__all__ = ["DatasetSpec", "Splits", "dataset_spec", "list_datasets", "register_dataset"]

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    """What a data set's loader returns: its three splits, and a checksum of its images.

    ``content`` (optional) lets a resumed run or a cached result refuse other images under the
    same name; loaders that cannot compute it cheaply leave it empty.

    Example::

        Splits(image_folder_split(root, "train"), image_folder_split(root, "val"), image_folder_split(root, "test"))
    """

    train: ImageClassDataset
    val: ImageClassDataset
    test: ImageClassDataset
    content: str = ""

    def by_name(self) -> dict[str, ImageClassDataset]:
        """The splits as ``{"train": ..., "val": ..., "test": ...}``."""
        return {split: getattr(self, split) for split in SPLITS}


@dataclass(frozen=True)
class DatasetSpec:
    """One registered data set (see :func:`register_dataset` for the fields).

    Example::

        dataset_spec("mini-imagenet").recipe.native_size   # 84
    """

    name: str
    load: Callable[..., Splits]
    recipe: ImageRecipe
    options: frozenset[str] = frozenset()
    loading_options: frozenset[str] = frozenset()
    max_per_class: int | None = None
    standard: bool = False
    seeded: bool = False
    needs_root: bool = False
    named_classes: bool = False


# name -> spec, in registration order; filled by register_dataset.
_REGISTRY: dict[str, DatasetSpec] = {}


def _folded(name: str) -> str:
    # "mini_imagenet", "Mini-ImageNet" and "miniimagenet" are one name.
    return name.strip().lower().replace("_", "").replace("-", "")


def register_dataset(
    name: str,
    *,
    recipe: ImageRecipe,
    options: Iterable[str] = (),
    loading_options: Iterable[str] = (),
    max_per_class: int | None = None,
    standard: bool = False,
    seeded: bool = False,
    needs_root: bool = False,
    named_classes: bool = False,
) -> Callable[[Callable[..., Splits]], Callable[..., Splits]]:
    """Register a loader under ``name`` for :func:`~mtl_plugin.get_benchmark` and the bench.

    The loader is called as ``load(root, image_size=..., data_seed=..., **options)`` and returns
    :class:`Splits` of untransformed :class:`~mtl_plugin.data.images.ImageClassDataset` s (e.g.
    from :func:`~mtl_plugin.data.folders.image_folder_split`); ``get_benchmark`` applies the
    recipe's transforms. ``root`` is the folder given, else ``$MTL_DATA/<name>``.

    Args:
        name: the name to load it by (``get_benchmark(name)``, ``--data NAME``).
        recipe: channels, usual image size, normalisation and pretraining augmentation.
        options: the keyword options ``get_benchmark`` passes on to the loader.
        loading_options: those of ``options`` that change how the data is produced, not what it
            is (kept out of the settings that checkpoints record).
        max_per_class: the most images a class holds (shots + queries can be no more); ``None``:
            it depends on the files.
        standard: a published benchmark, whose published figures the bench prints beside ours.
        seeded: the contents depend on ``data_seed`` (recorded with the data's settings).
        needs_root: there is no default folder: ``root`` must be given.
        named_classes: a class name identifies the class whatever its images, so the leak check
            may compare names (an image folder's names do not).

    Returns:
        A decorator that registers the loader and returns it unchanged.

    Raises:
        UsageError: ``name`` is registered already (in any case, with or without ``-`` or ``_``).

    Example::

        @register_dataset("glyphs", recipe=ImageRecipe(native_size=32, channels=1), needs_root=True)
        def glyphs(root, *, image_size, data_seed):
            return Splits(*(image_folder_split(root, s) for s in ("train", "val", "test")))
    """

    def register(load: Callable[..., Splits]) -> Callable[..., Splits]:
        taken = [spec.name for spec in _REGISTRY.values() if _folded(spec.name) == _folded(name)]
        if taken:
            raise UsageError(f"a data set named {name!r} is registered already ({taken[0]}); pick another name")
        _REGISTRY[name] = DatasetSpec(
            name=name,
            load=load,
            recipe=recipe,
            options=frozenset(options),
            loading_options=frozenset(loading_options),
            max_per_class=max_per_class,
            standard=standard,
            seeded=seeded,
            needs_root=needs_root,
            named_classes=named_classes,
        )
        return load

    return register


def list_datasets() -> list[str]:
    """The registered data set names, in registration order.

    Example::

        list_datasets()  # ['kanji', 'mini-imagenet', 'tiered-imagenet', 'fc100', 'cifarfs', 'omniglot', 'folder']
    """
    return list(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    """The registered data set ``name``, in any case, with ``-``, ``_`` or nothing between its words.

    Raises:
        UsageError: no data set of that name is registered.

    Example::

        dataset_spec("miniimagenet").name   # 'mini-imagenet'
    """
    for spec in _REGISTRY.values():
        if _folded(spec.name) == _folded(name):
            return spec
    raise UsageError(
        f"unknown data set {name!r}: known ones are {', '.join(_REGISTRY)} (or register yours with register_dataset)"
    )


def dataset_named(name: str) -> DatasetSpec | None:
    """The registered data set ``name`` as recorded (exactly), or ``None``: for names read back from a checkpoint."""
    return _REGISTRY.get(name)


_KANJI_LOADING = frozenset({"cache_dir", "workers", "progress"})


def _kanji(root: Path, *, image_size: int, data_seed: int, **options) -> Splits:
    # root is the cache folder the generated arrays live in.
    loader = {k: options.pop(k) for k in _KANJI_LOADING if k in options}
    loader.setdefault("cache_dir", root)
    data = load_kanji(KanjiConfig(image_size=image_size, seed=data_seed, **options), **loader)
    splits = []
    for split in SPLITS:
        pixels = data.split_pixels(split)
        classes, instances = pixels.shape[:2]
        splits.append(
            ImageClassDataset(
                ArraySource(pixels.reshape(-1, *pixels.shape[2:]), origin=f"kanji {split}"),
                np.repeat(np.arange(classes), instances).tolist(),
                [chr(cp) for cp in data.split_classes(split)],
            )
        )
    return Splits(*splits, content=data.manifest.get("sha256", ""))


def _published(name: str) -> Callable[..., Splits]:
    def load(root: Path, *, image_size: int, data_seed: int, **options) -> Splits:
        return Splits(*(read_split(name, root, split, **options) for split in SPLITS))

    return load


def _omniglot(root: Path, *, image_size: int, data_seed: int, **options) -> Splits:
    # The character split is drawn with data_seed: part of the data set, not of a task.
    return Splits(*(read_split("omniglot", root, split, seed=data_seed, **options) for split in SPLITS))


def _folder(root: Path, *, image_size: int, data_seed: int) -> Splits:
    splits = {split: image_folder_split(root, split) for split in SPLITS}
    return Splits(**splits, content=folder_content(root, splits))


_KANJI_FIELDS = frozenset(f.name for f in dataclasses.fields(KanjiConfig)) - {"image_size", "seed"}
# MTL's code (after FEAT) resizes to 92/80 of the side and centre-crops; pretraining crops at random and flips.
_MINI = ImageRecipe(84, 3, *CIFAR_STATS, crop_ratio=80 / 92, augmentation="resized-crop")
# MetaOptNet and RFS: a random crop with 4 px padding, a flip and colour jitter 0.4.
_CIFAR = ImageRecipe(32, 3, *CIFAR_STATS, augmentation="padded-crop", colour_jitter=0.4)

register_dataset(
    "kanji",
    recipe=ImageRecipe(28, 1, interpolation=InterpolationMode.LANCZOS),
    options=_KANJI_FIELDS | _KANJI_LOADING,
    loading_options=_KANJI_LOADING,
    max_per_class=20,
    seeded=True,
    named_classes=True,
)(_kanji)
for _name, _recipe, _cap in (
    ("mini-imagenet", _MINI, 600),
    ("tiered-imagenet", _MINI, None),  # 732 or more a class
    ("fc100", _CIFAR, 600),
    ("cifarfs", _CIFAR, 600),
):
    register_dataset(_name, recipe=_recipe, max_per_class=_cap, standard=True, named_classes=True)(_published(_name))
register_dataset(
    "omniglot",
    # Strokes 1 on 0, as kanji's: Omniglot's files are black on white.
    recipe=ImageRecipe(28, 1, invert=True, interpolation=InterpolationMode.LANCZOS),
    options=("rotations",),
    max_per_class=20,
    standard=True,
    seeded=True,
    named_classes=True,
)(_omniglot)
# mini-ImageNet's recipe with ImageNet's statistics: a user's photos are more often ImageNet-like.
register_dataset("folder", recipe=replace(_MINI, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1]), needs_root=True)(
    _folder
)
