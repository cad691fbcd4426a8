"""The published few-shot benchmarks, read from local files in their usual on-disk formats.

Nothing here downloads. Each reader takes the folder ``root`` that holds the
files learn2learn would have downloaded and returns one split as an
:class:`~mtl_plugin.data.images.ImageClassDataset` (labels 0..n-1 within the split,
no transform yet). A missing file raises :class:`~mtl_plugin.errors.MissingDataError`
(a ``FileNotFoundError``) naming the path and the format expected there; an
unreadable one :class:`~mtl_plugin.errors.DataError`.

The mini-ImageNet, tieredImageNet and FC100 files are Python pickles, the formats
they are distributed in. Loading a pickle can run code that it names, so these
files must come from a trusted source (the data set's own distribution), never from
an unknown third party. Checkpoints are different: ``mtl`` loads them with
``weights_only=True``, which refuses anything but tensors and plain containers.

==================  ==========================================================
name                files under ``root``
==================  ==========================================================
``mini-imagenet``   ``mini-imagenet-cache-{train,validation,test}.pkl``: dict with
                    ``image_data`` (uint8 N x 84 x 84 x 3) and ``class_dict``
                    ({class name: [row indices]})
``tiered-imagenet`` ``tiered-imagenet/{train,val,test}_images_png.pkl`` (list of PNG
                    bytes) and ``tiered-imagenet/{split}_labels.pkl`` (dict with
                    ``label_specific``: int per image)
``fc100``           ``FC100_{train,val,test}.pickle``: dict with ``data`` (uint8
                    N x 32 x 32 x 3) and ``labels`` (int per image), latin-1 pickle
``cifarfs``         ``cifarfs/processed/{train,val,test}/<class>/*.png``, or the raw
                    ``cifarfs/cifar100/data/<class>/*.png`` with
                    ``cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt``
``omniglot``        ``omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png``
==================  ==========================================================

learn2learn's own classes read FC100 and tieredImageNet here. Its
``MiniImagenet`` turns the whole split into one float tensor (3 GB for train),
its ``CIFARFS`` copies the images into ``processed/`` under ``root``, and
torchvision's ``Omniglot`` (under ``FullOmniglot``) insists on the original zip
files' checksums, so those three formats are read directly.

Example::

    from mtl_plugin.data.standard import read_split
    test = read_split("fc100", "~/data/fc100", "test")
    len(test.class_names)     # 20
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import learn2learn as l2l
import numpy as np

from mtl_plugin.data.folders import class_folders_dataset, image_folder_split
from mtl_plugin.data.images import ArraySource, EncodedSource, ImageClassDataset
from mtl_plugin.errors import DataError, MissingDataError, UsageError

__all__ = ["STANDARD_READERS", "read_split", "OMNIGLOT_SPLIT"]

SPLITS = ("train", "val", "test")
_L2L_MODE = {"train": "train", "val": "validation", "test": "test"}
# MAML's protocol (Finn et al. 2017) on Vinyals et al.'s 1,200/423 character split:
# 1,200 meta-training characters of which 100 are held out for validation.
OMNIGLOT_SPLIT = (1100, 100, 423)
# What unpickling raises on garbage, truncated or foreign bytes (a truncated file ends in EOFError,
# random bytes in UnpicklingError or a bad opcode argument, a pickle of other classes in an import error).
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
)


def _require(path: Path, name: str, fmt: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{name}: expected {path} ({fmt}); nothing is downloaded, so put the file there "
            f"or pass root= (mtl: --root) pointing at the folder that holds it"
        )
    return path


def _relabel(labels, origin: str) -> tuple:
    """Map arbitrary label values to 0..n-1 in sorted order; names keep the original values."""
    labels = np.asarray(labels).reshape(-1)
    values, dense = np.unique(labels, return_inverse=True)
    if len(values) == 0:
        raise DataError(f"{origin} holds no images; check that the file is complete")
    return dense.tolist(), [str(v) for v in values.tolist()]


def _read_mini_imagenet(root: Path, split: str) -> ImageClassDataset:
    path = _require(
        root / f"mini-imagenet-cache-{_L2L_MODE[split]}.pkl",
        "mini-imagenet",
        "a pickle dict with 'image_data': uint8 array N x 84 x 84 x 3 and 'class_dict': {name: [indices]}",
    )
    try:
        with open(path, "rb") as handle:
            archive = pickle.load(handle)
    except _PICKLE_ERRORS as error:
        raise DataError(
            f"{path}: not a readable pickle, truncated or damaged ({type(error).__name__}: "
            f"{error}); replace it with a complete copy of the mini-ImageNet file"
        ) from error
    if not isinstance(archive, dict) or "image_data" not in archive or "class_dict" not in archive:
        raise DataError(f"{path}: expected a dict with keys 'image_data' and 'class_dict'")
    pixels = np.asarray(archive["image_data"])
    names = sorted(archive["class_dict"])
    labels = np.full(len(pixels), -1, dtype=np.int64)
    for label, name in enumerate(names):
        try:
            indices = np.asarray(archive["class_dict"][name], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as error:
            raise DataError(
                f"{path}: class {name!r} of 'class_dict' is not a list of image indices ({error}); "
                f"replace it with a complete copy of the mini-ImageNet file"
            ) from error
        if not indices.size:
            # An empty class fails only deep inside training, when a task draws it.
            raise DataError(
                f"{path}: class {name!r} of 'class_dict' lists no image; replace it with a complete "
                f"copy of the mini-ImageNet file"
            )
        # A negative index would wrap around to another image instead of failing.
        outside = indices[(indices < 0) | (indices >= len(pixels))]
        if outside.size:
            raise DataError(
                f"{path}: class {name!r} of 'class_dict' lists image {int(outside[0])}, but the file "
                f"holds images 0 to {len(pixels) - 1}; replace it with a complete copy of the "
                f"mini-ImageNet file"
            )
        labels[indices] = label
    if (labels < 0).any():
        raise DataError(f"{path}: image {int(np.argmax(labels < 0))} belongs to no class in 'class_dict'")
    return ImageClassDataset(ArraySource(pixels, origin=str(path)), labels.tolist(), names)


def _read_tiered_imagenet(root: Path, split: str) -> ImageClassDataset:
    folder = root / "tiered-imagenet"
    images = _require(folder / f"{split}_images_png.pkl", "tiered-imagenet", "a pickle list of PNG-encoded images")
    _require(folder / f"{split}_labels.pkl", "tiered-imagenet", "a pickle dict with 'label_specific': int per image")
    try:
        dataset = l2l.vision.datasets.TieredImagenet(str(root), mode=_L2L_MODE[split], download=False)
    except _PICKLE_ERRORS as error:
        raise DataError(
            f"{folder}: unreadable tieredImageNet pickles, truncated or damaged ({error!r}); "
            f"replace them with complete copies"
        ) from error
    labels, names = _relabel(dataset.labels, str(images))
    return ImageClassDataset(EncodedSource(dataset.images, origin=str(images)), labels, names)


def _read_fc100(root: Path, split: str) -> ImageClassDataset:
    path = _require(
        root / f"FC100_{split}.pickle",
        "fc100",
        "a latin-1 pickle dict with 'data': uint8 array N x 32 x 32 x 3 and 'labels': int per image",
    )
    try:
        dataset = l2l.vision.datasets.FC100(str(root), mode=_L2L_MODE[split], download=False)
    except _PICKLE_ERRORS as error:
        raise DataError(
            f"{path}: unreadable FC100 pickle, truncated or damaged ({error!r}); replace it with a complete copy"
        ) from error
    labels, names = _relabel(dataset.labels, str(path))
    return ImageClassDataset(ArraySource(np.asarray(dataset.images), origin=str(path)), labels, names)


def _read_cifarfs(root: Path, split: str) -> ImageClassDataset:
    base = root / "cifarfs"
    processed = base / "processed" / split
    if processed.is_dir():
        return image_folder_split(base / "processed", split)
    split_file = _require(
        base / "cifar100" / "splits" / "bertinetto" / f"{split}.txt",
        "cifarfs",
        f"one class name per line; or give the ready split as {processed}/<class>/*.png",
    )
    data = _require(base / "cifar100" / "data", "cifarfs", "one folder of PNG images per CIFAR-100 class")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    return class_folders_dataset((name, data / name) for name in names)


def _omniglot_characters(root: Path) -> list[Path]:
    # Background set first, each set in sorted order: the order the seeded split shuffles.
    base = root / "omniglot-py"
    characters: list[Path] = []
    for part in ("images_background", "images_evaluation"):
        folder = _require(base / part, "omniglot", "<alphabet>/<character>/*.png, as torchvision unpacks Omniglot")
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
            characters.extend(sorted(p for p in alphabet.iterdir() if p.is_dir()))
    return characters


def _read_omniglot(root: Path, split: str, seed: int = 0, rotations: bool = True) -> ImageClassDataset:
    characters = _omniglot_characters(root)
    if len(characters) < 3:
        raise DataError(f"omniglot under {root}: found {len(characters)} characters, need at least 3")
    order = list(range(len(characters)))
    random.Random(seed).shuffle(order)
    # Scaled to the number found, so a partial copy still splits in the same proportions.
    total = sum(OMNIGLOT_SPLIT)
    train = round(len(order) * OMNIGLOT_SPLIT[0] / total)
    val = max(1, round(len(order) * OMNIGLOT_SPLIT[1] / total))
    chosen = {"train": order[:train], "val": order[train : train + val], "test": order[train + val :]}[split]
    chosen = sorted(chosen)
    folders = [(f"{characters[i].parent.name}/{characters[i].name}", characters[i]) for i in chosen]
    dataset = class_folders_dataset(folders)
    if not rotations:
        return dataset
    # Rotations by 0/90/180/270 degrees are classes of their own (Santoro et al. 2016, Vinyals et al. 2016).
    angles = (0, 90, 180, 270)
    items = [(k, a) for k in range(len(dataset)) for a in range(len(angles))]
    return ImageClassDataset(
        dataset.source,
        [dataset.labels[k] * len(angles) + a for k, a in items],
        [f"{name}@{angle}" for name in dataset.class_names for angle in angles],
        indices=[dataset.indices[k] for k, _ in items],
        rotations=[angles[a] for _, a in items],
    )


STANDARD_READERS: dict[str, Callable[..., ImageClassDataset]] = {
    "mini-imagenet": _read_mini_imagenet,
    "tiered-imagenet": _read_tiered_imagenet,
    "fc100": _read_fc100,
    "cifarfs": _read_cifarfs,
    "omniglot": _read_omniglot,
}


def read_split(name: str, root: os.PathLike, split: str, **options) -> ImageClassDataset:
    """One split of a published benchmark; ``options`` go to the reader (Omniglot: ``seed``, ``rotations``).

    Example::

        train = read_split("mini-imagenet", "~/data/mini", "train")
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {SPLITS}")
    if name not in STANDARD_READERS:
        raise UsageError(f"unknown benchmark {name!r}: files can be read for {sorted(STANDARD_READERS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataError(f"{name}: the data folder {root} does not exist; pass root= (mtl: --root)")
    return STANDARD_READERS[name](root, split, **options)
