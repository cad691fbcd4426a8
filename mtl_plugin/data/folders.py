"""Image folders: ``root/{train,val,test}/<class>/<image>`` with PNG or JPEG files.

Bring your own data by laying it out this way and calling
``get_benchmark("folder", root=...)``. Classes are numbered in sorted folder-name
order; files in sorted name order. Hidden folders and files (names starting with
``.``, e.g. ``.ipynb_checkpoints``, ``.cache``, macOS's ``._x.png``) are not data.
:func:`folder_content` is the digest a run records, so that resuming on other or
changed images is refused.

Example::

    from mtl_plugin.data.folders import image_folder_split
    train = image_folder_split("my_data", "train")     # an ImageClassDataset
    train.class_names[:3], train.class_counts()[:3]
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from mtl_plugin.data.images import FileSource, ImageClassDataset
from mtl_plugin.errors import DataError, MissingDataError, UsageError

__all__ = ["IMAGE_SUFFIXES", "class_folders_dataset", "folder_content", "image_folder_split"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_SPLITS = ("train", "val", "test")


def _visible(path: Path) -> bool:
    # Tools keep their own files in hidden entries (.ipynb_checkpoints, .cache, macOS's ._x.png).
    return not path.name.startswith(".")


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as error:
        raise DataError(f"unreadable folder {folder}: {error}; fix its permissions or remove it") from error


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in _entries(folder) if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders_dataset(folders: Iterable[tuple[str, Path]]) -> ImageClassDataset:
    """One class per ``(name, folder)``, labelled 0..n-1 in the given order.

    Raises:
        MissingDataError: a folder does not exist.
        DataError: a folder holds no PNG or JPEG image.

    Example::

        dataset = class_folders_dataset([("cat", Path("a/cat")), ("dog", Path("a/dog"))])
    """
    paths, labels, names = [], [], []
    for label, (name, folder) in enumerate(folders):
        if not folder.is_dir():
            raise MissingDataError(f"class folder {folder} does not exist")
        names.append(name)
        images = _images_in(folder)
        if not images:
            raise DataError(
                f"class folder {folder} holds no {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} "
                f"image; add its images or remove the folder"
            )
        paths.extend(images)
        labels.extend([label] * len(images))
    return ImageClassDataset(FileSource(paths), labels, names)


def image_folder_split(root: os.PathLike, split: str) -> ImageClassDataset:
    """The ``split`` ("train", "val" or "test") of an image-folder data set under ``root``.

    Raises:
        UsageError: an unknown ``split``.
        MissingDataError: ``root/split`` is missing or holds no class folder.
        DataError: a class folder holds no image.

    Example::

        test = image_folder_split("my_data", "test")
    """
    if split not in FOLDER_SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {FOLDER_SPLITS}")
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise MissingDataError(
            f"image folder data set: expected the folder {folder} holding one sub-folder per class "
            f"with {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} images "
            f"(layout root/{{train,val,test}}/<class>/<image>)"
        )
    classes = sorted(p for p in _entries(folder) if p.is_dir() and _visible(p))
    if not classes:
        raise MissingDataError(
            f"image folder data set: {folder} has no class sub-folders (expected {folder}/<class>/<image>)"
        )
    return class_folders_dataset((p.name, p) for p in classes)


def folder_content(root: os.PathLike, splits: Mapping[str, ImageClassDataset]) -> str:
    """A SHA-256 digest of the image-folder data set ``splits`` read from ``root``: every image's
    split, class, file name and bytes; and a warning if one image is in two splits.

    Recorded in checkpoints (:func:`~mtl_plugin.data.benchmark.benchmark_identity`), so that a
    run resumed on another folder with as many classes, or on images replaced in place, is
    refused. It reads every file once (as the first epoch does); a copy of the same folder
    elsewhere gives the same digest.

    Warns:
        UserWarning: the same bytes are an image of two splits (e.g. test images copied into
            train), once per pair of splits: accuracy on images seen in training is not few-shot
            accuracy.

    Example::

        splits = {s: image_folder_split("my_data", s) for s in ("train", "val", "test")}
        folder_content("my_data", splits)   # '5f0c...'
    """
    root = Path(root).expanduser()
    digest = hashlib.sha256()
    first_seen: dict = {}
    shared: dict = {}
    for split, dataset in splits.items():
        for path in dataset.source.paths:
            # Relative: the name of a split, a class and a file, not where the folder lives.
            name = path.relative_to(root).as_posix()
            image = hashlib.sha256(path.read_bytes()).hexdigest()
            digest.update(f"{split}\0{name}\0{image}\0".encode())
            earlier = first_seen.setdefault(image, (split, name))
            if earlier[0] != split:
                shared.setdefault((earlier[0], split), []).append((earlier[1], name))
    for (one, other), pairs in shared.items():
        warnings.warn(
            f"image folder data set {root}: {len(pairs)} image(s) of the {other} split are also in the "
            f"{one} split (same bytes, e.g. {pairs[0][1]} = {pairs[0][0]}); a result on images seen in "
            f"another split is not a few-shot result: keep each image in one split",
            stacklevel=2,
        )
    return digest.hexdigest()
