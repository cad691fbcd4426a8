"""Labelled image collections, decoded lazily, and their learn2learn ``MetaDataset`` wrapper.

Every data set in :mod:`mtl_plugin.data` ends up as an :class:`ImageClassDataset`:
a source of PIL images (an in-memory array, encoded bytes, or files), integer
labels ``0..n-1`` and a torchvision transform. Labels are known up front, so the
``MetaDataset`` is built without decoding every image once (which learn2learn
otherwise does, and which also writes a bookkeeping pickle next to the data).

Example::

    import numpy as np
    from mtl_plugin.data.images import ArraySource, ImageClassDataset, as_meta_dataset
    pixels = np.zeros((4, 28, 28), dtype=np.uint8)
    dataset = ImageClassDataset(ArraySource(pixels), labels=[0, 0, 1, 1], class_names=["a", "b"])
    meta = as_meta_dataset(dataset)      # meta.labels == [0, 1]
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import learn2learn as l2l
import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from mtl_plugin.errors import DataError, UsageError

__all__ = [
    "ArraySource",
    "EncodedSource",
    "FileSource",
    "ImageClassDataset",
    "as_meta_dataset",
    "drop_small_classes",
]

# Integer grayscale modes PIL opens 16-bit PNGs (and TIFFs) in. Its convert("L") clips them at 255
# instead of scaling, which turns every pixel above 255 of 65535 white.
_WIDE_GRAYSCALE = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with a 16-bit grayscale range scaled to 8 bits (``0..65535 -> 0..255``); others as they are."""
    if image.mode not in _WIDE_GRAYSCALE:
        return image
    pixels = np.asarray(image, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")


class ArraySource:
    """Images held in a ``uint8`` array of shape (N, H, W) or (N, H, W, C).

    Example::

        source = ArraySource(np.zeros((2, 32, 32, 3), dtype=np.uint8))
        image = source[0]            # a 32x32 RGB PIL image
    """

    def __init__(self, pixels: np.ndarray, origin: str = "array"):
        if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
            raise DataError(
                f"{origin}: expected a uint8 array of shape (N, H, W) or (N, H, W, C), "
                f"got {pixels.dtype} with shape {pixels.shape}"
            )
        self.pixels = pixels
        self.origin = origin

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index])

    def raw(self, index: int) -> bytes:
        """The image as stored, for content digests."""
        return self.pixels[index].tobytes()

    def describe(self, index: int) -> str:
        return f"{self.origin}[{index}]"


class EncodedSource:
    """Images stored as encoded bytes (PNG/JPEG), e.g. tieredImageNet's pickles.

    Example::

        source = EncodedSource([png_bytes], origin="train_images_png.pkl")
        image = source[0]
    """

    def __init__(self, blobs: Sequence, origin: str = "encoded images"):
        self.blobs = blobs
        self.origin = origin

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(memoryview(self.blobs[index])))
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            raise DataError(f"corrupt image {self.describe(index)}: {error}; replace the file") from error
        return _eight_bit(image)

    def raw(self, index: int) -> bytes:
        """The image as stored, for content digests."""
        return bytes(self.blobs[index])

    def describe(self, index: int) -> str:
        return f"{self.origin}[{index}]"


class FileSource:
    """Images stored one per file (PNG or JPEG).

    Example::

        source = FileSource([Path("root/train/cat/1.png")])
        image = source[0]
    """

    def __init__(self, paths: Sequence[os.PathLike]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image.load()
                return _eight_bit(image.copy())
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            raise DataError(f"corrupt or unreadable image {path}: {error}; remove or replace it") from error

    def raw(self, index: int) -> bytes:
        """The image as stored, for content digests."""
        try:
            return self.paths[index].read_bytes()
        except OSError as error:
            raise DataError(
                f"unreadable image {self.paths[index]}: {error}; fix its permissions or remove it"
            ) from error

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class ImageClassDataset(Dataset):
    """``(transform(image), label)`` pairs with labels ``0..len(class_names)-1``.

    ``indices`` maps item ``k`` to ``source[indices[k]]`` (default: identity) and
    ``rotations`` rotates item ``k`` by that many degrees counter-clockwise, which
    is how Omniglot's rotated copies become classes of their own. With ``memoise``,
    each item's transformed image is kept after its first read and handed out again
    (the same tensor: consumers must not modify it in place; batching copies it);
    only for a deterministic transform, since a random augmentation would be frozen.

    Example::

        dataset = ImageClassDataset(source, labels=[0, 1], class_names=["cat", "dog"],
                                    transform=torchvision.transforms.ToTensor())
        x, y = dataset[1]
    """

    def __init__(
        self,
        source,
        labels: Sequence[int],
        class_names: Sequence[str],
        transform: Callable | None = None,
        mode: str | None = None,
        indices: Sequence[int] | None = None,
        rotations: Sequence[int] | None = None,
        memoise: bool = False,
    ):
        self.source = source
        self.labels = [int(label) for label in labels]
        self.class_names = list(class_names)
        self.transform = transform
        self.mode = mode
        self.indices = list(range(len(self.labels))) if indices is None else list(indices)
        self.rotations = rotations
        # Decoding a 28 px image and converting it to a tensor took longer than a Conv4
        # forward on it (0.3-0.4 ms against about 0.2 ms on a 2-core CPU): evaluation and
        # pretraining re-read the same images thousands of times.
        self._memo: dict | None = {} if memoise else None
        if len(self.indices) != len(self.labels):
            raise DataError(f"{len(self.indices)} indices but {len(self.labels)} labels")
        if self.labels and (min(self.labels) < 0 or max(self.labels) >= len(self.class_names)):
            raise DataError(f"labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def memoised(self) -> bool:
        """Whether transformed images are kept after their first read."""
        return self._memo is not None

    def __getitem__(self, item: int):
        if self._memo is not None:
            image = self._memo.get(item)
            if image is None:
                image = self._memo[item] = self._load(item)
            return image, self.labels[item]
        return self._load(item), self.labels[item]

    def _load(self, item: int):
        image = self.source[self.indices[item]]
        if self.mode is not None and image.mode != self.mode:
            image = image.convert(self.mode)
        if self.rotations is not None and self.rotations[item]:
            image = image.rotate(self.rotations[item])
        if self.transform is not None:
            image = self.transform(image)
        return image

    def with_transform(self, transform: Callable | None, memoise: bool = False) -> ImageClassDataset:
        """The same images and labels under another transform (e.g. training augmentation);
        ``memoise`` as in the constructor (nothing read under the old transform is kept)."""
        return ImageClassDataset(
            self.source,
            self.labels,
            self.class_names,
            transform,
            self.mode,
            self.indices,
            self.rotations,
            memoise,
        )

    def subset(self, keep: Sequence[int]) -> ImageClassDataset:
        """Only the items in ``keep``, with their classes renumbered ``0..m-1`` in order."""
        kept_labels = sorted({self.labels[k] for k in keep})
        renumber = {old: new for new, old in enumerate(kept_labels)}
        return ImageClassDataset(
            self.source,
            [renumber[self.labels[k]] for k in keep],
            [self.class_names[old] for old in kept_labels],
            self.transform,
            self.mode,
            [self.indices[k] for k in keep],
            None if self.rotations is None else [self.rotations[k] for k in keep],
            self.memoised,
        )

    def class_counts(self) -> list[int]:
        """Number of items in each class, indexed by label."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.class_names)).tolist()


def drop_small_classes(dataset: ImageClassDataset, min_per_class: int) -> ImageClassDataset:
    """Drop the classes with fewer than ``min_per_class`` items and renumber the rest.

    Example::

        dataset = drop_small_classes(dataset, min_per_class=shots + queries)
    """
    counts = dataset.class_counts()
    keep = [k for k, label in enumerate(dataset.labels) if counts[label] >= min_per_class]
    if not keep:
        raise UsageError(
            f"no class has {min_per_class} images or more (largest has {max(counts, default=0)}); "
            f"lower shots or queries"
        )
    return dataset.subset(keep)


def as_meta_dataset(dataset: ImageClassDataset) -> l2l.data.MetaDataset:
    """A learn2learn ``MetaDataset`` over ``dataset``, built from its known labels.

    Example::

        meta = as_meta_dataset(dataset)
        tasks = mtl_plugin.tasks.build_taskset(meta, ways=5, shots=1, queries=15)
    """
    labels_to_indices: dict = {}
    for index, label in enumerate(dataset.labels):
        labels_to_indices.setdefault(label, []).append(index)
    return l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices)
