"""The leak guard: which classes a model was trained on, recorded by content, and the check that
no val or test class of the data at hand is among them.

A few-shot result counts only on classes the model never saw. Pretraining and meta-training
record their training classes in every checkpoint (:func:`class_record`); ``mtl meta-train
--pretrained``, ``mtl evaluate``, ``mtl bench`` and :func:`~mtl_plugin.training.checkpoints.load_learner`
given a ``benchmark`` check that record against the val and test classes (:func:`check_unseen`).

A class is known by two digests:

* its **content**: the SHA-256 of its images' bytes (as stored: array pixels, encoded or file
  bytes; with Omniglot's rotation), so that a class copied under another folder name is caught;
* its **name** within a data set whose class names are identities (a kanji's code point, an
  ImageNet wnid, an Omniglot character; not an image folder's, where ``c0`` names anything),
  so that a kanji drawn again under another data seed is still that kanji.

Example::

    bench = get_benchmark("kanji")
    record = class_record(bench.train, bench.name)   # what a pretraining on bench records
    check_unseen(record, bench, "runs/pre/best.pt")  # passes: each class is in one split
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch

from mtl_plugin.data.images import ImageClassDataset
from mtl_plugin.data.registry import dataset_named
from mtl_plugin.errors import DataError

__all__ = ["ClassLeakError", "check_unseen", "class_record", "merge_records", "seen_classes"]

# 64 bits a digest: no two of a data set's classes collide by chance, and a 1,600-class record stays small.
_DIGEST_CHARS = 16


class ClassLeakError(DataError):
    """A val or test class of the data at hand was seen in training (``mtl`` exit code 1)."""


def _digest(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in sorted(parts):
        digest.update(part)
    return digest.hexdigest()[:_DIGEST_CHARS]


def _raw_image(dataset: ImageClassDataset, item: int) -> bytes:
    """One image's stored bytes and rotation, hashed: what the image is, not how it is transformed."""
    stored = dataset.source.raw(dataset.indices[item])
    rotation = dataset.rotations[item] if dataset.rotations is not None else 0
    return hashlib.sha256(stored + f"\0{rotation}".encode()).digest()


def _class_digests(meta: Any, data_name: str | None) -> list[tuple[str, str | None]]:
    """Each class of a learn2learn ``MetaDataset`` as (content digest, name digest or ``None``), in label order."""
    dataset = meta.dataset
    if isinstance(dataset, ImageClassDataset):
        image = lambda item: _raw_image(dataset, item)  # noqa: E731
        spec = dataset_named(data_name) if data_name is not None else None
        named = spec is not None and spec.named_classes
    else:
        # Any other dataset (a user's own): the tensors it gives, which is what the model saw.
        image = lambda item: hashlib.sha256(torch.as_tensor(dataset[item][0]).numpy().tobytes()).digest()  # noqa: E731
        named = False
    return [
        (
            _digest([image(item) for item in meta.labels_to_indices[label]]),
            _digest([f"{data_name}\0{dataset.class_names[label]}".encode()]) if named else None,
        )
        for label in sorted(meta.labels_to_indices)
    ]


def class_record(meta: Any, data_name: str | None = None) -> dict:
    """The record of the classes of ``meta`` (a split), for a checkpoint to keep.

    Args:
        meta: a learn2learn ``MetaDataset``, e.g. ``benchmark.train``.
        data_name: the data set's name; its class names are recorded where they are identities
            (registered with ``named_classes=True``).

    Returns:
        ``{"content": [...], "names": [...]}``: digests, sorted (plain strings, loadable with
        ``weights_only=True``).

    Example::

        record = class_record(bench.train, bench.name)
    """
    digests = _class_digests(meta, data_name)
    return {
        "content": sorted(content for content, _ in digests),
        "names": sorted(name for _, name in digests if name is not None),
    }


def merge_records(*records: dict | None) -> dict:
    """The classes of several trainings of one model (pretraining, then meta-training) as one record.

    Example::

        record = merge_records(pretrained_state.get("classes"), class_record(bench.train, bench.name))
    """
    present = [record for record in records if record is not None]
    return {key: sorted({digest for record in present for digest in record[key]}) for key in ("content", "names")}


def seen_classes(record: dict, benchmark: Any, splits: tuple[str, ...] = ("val", "test")) -> dict[str, int]:
    """How many classes of each split of ``benchmark`` ``record`` holds, by content or by name.

    Example::

        seen_classes(state["classes"], bench)   # {'val': 0, 'test': 0}
    """
    content, names = set(record["content"]), set(record["names"])
    name = getattr(benchmark, "name", None)
    return {
        split: sum(c in content or n in names for c, n in _class_digests(getattr(benchmark, split), name))
        for split in splits
    }


def check_unseen(
    record: dict | None,
    benchmark: Any,
    source: str,
    allow_seen_classes: bool = False,
    splits: tuple[str, ...] = ("val", "test"),
) -> None:
    """Refuse a model trained on a val or test class of ``benchmark``.

    Args:
        record: the checkpoint's ``classes`` entry (:func:`class_record`), or ``None`` for a
            checkpoint written before classes were recorded (a warning says it cannot be checked).
        benchmark: the data at hand (its ``val`` and ``test`` splits, and its ``name``).
        source: the checkpoint, for the messages.
        allow_seen_classes: check nothing; for deliberate transfer studies.
        splits: the splits that must be unseen.

    Raises:
        ClassLeakError: naming the split and how many of its classes were seen.

    Example::

        check_unseen(state.get("classes"), bench, "runs/meta/best.pt")
    """
    if allow_seen_classes:
        return
    if record is None:
        warnings.warn(
            f"{source} predates the record of its training classes: cannot check that no val or test "
            f"class was seen in training; train it again to have it checked",
            stacklevel=2,
        )
        return
    seen = {split: count for split, count in seen_classes(record, benchmark, splits).items() if count}
    if seen:
        split, count = next(iter(seen.items()))
        total = len(getattr(benchmark, split).labels)
        raise ClassLeakError(
            f"{source} was trained on {count} of the {total} {split} classes of this data (by their images "
            f"or names): a result on classes seen in training is not a few-shot result; train on this data "
            f"set's train split (with the same data seed) and keep each class in one split, or, for a "
            f"deliberate transfer study, pass allow_seen_classes=True"
        )
