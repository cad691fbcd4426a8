"""A pretraining checkpoint and the model record every checkpoint carries, read back before anything is built.

:func:`~mtl_plugin.training.pretrain.pretrain` writes ``best.pt`` (the best epoch's backbone) and
``last.pt`` (the resumable state), both with a *model record* under ``model``: the backbone's
name, ``in_channels`` and ``image_size``, by which :func:`build_pretrained` rebuilds it. A
meta-training checkpoint carries the same record (:mod:`mtl_plugin.training.checkpoints`). The
checks here refuse a wrong or damaged file with a :class:`~mtl_plugin.errors.DataError` naming
the argument that gave it (``checkpoint`` by default; ``mtl`` passes its flag).

:func:`read_pretrain_checkpoint` is the one reader of a pretraining ``best.pt``: the library
(:func:`load_pretrained`), ``mtl meta-train --pretrained`` and the bench read it there. ``mtl
evaluate``, which takes a checkpoint of either kind, reads its file once with
:func:`~mtl_plugin.utils.io.read_checkpoint` and applies the same checks
(:func:`check_pretrain_checkpoint`). A run folder's ``last.pt`` is read back by
:func:`~mtl_plugin.training.run_log.previous_run`.

Example::

    from mtl_plugin.training.pretrain_checkpoint import load_pretrained
    backbone = load_pretrained("runs/pre/best.pt")
    features = backbone(images)                      # (B, backbone.feature_dim)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from mtl_plugin.backbones import build_backbone, load_weights
from mtl_plugin.data.benchmark import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from mtl_plugin.data.leak import check_unseen
from mtl_plugin.errors import DataError
from mtl_plugin.utils.io import read_checkpoint

__all__ = [
    "CHECKPOINT_KIND",
    "build_pretrained",
    "check_backbone_fits",
    "check_model_record",
    "check_pretrain_checkpoint",
    "load_pretrained",
    "pretrained_backbone",
    "read_pretrain_checkpoint",
]

CHECKPOINT_KIND = "pretrain"


def build_pretrained(info: dict) -> nn.Module:
    """A backbone (no head) of the architecture a pretrain checkpoint's ``model`` entry names.

    Example::

        backbone = build_pretrained({"backbone": "conv4", "in_channels": 1, "image_size": 28})
    """
    return build_backbone(info["backbone"], in_channels=info["in_channels"], image_size=info["image_size"])


def pretrained_backbone(
    state: dict, path: str | Path, option: str = "checkpoint", info: dict | None = None
) -> nn.Module:
    """The backbone a pretrain checkpoint records, with its weights.

    Args:
        state: the checkpoint, read and checked (:func:`check_pretrain_checkpoint`).
        path: its file, for the message.
        option: the flag or argument that named it.
        info: the architecture to build (default: the checkpoint's ``model`` entry).

    Raises:
        DataError: the weights do not fit the architecture the record names (a damaged or
            edited file, or one record copied onto other weights).

    Example::

        backbone = pretrained_backbone(state, "runs/pre/best.pt")
    """
    info = state["model"] if info is None else info
    backbone = build_pretrained(info)
    try:
        load_weights(backbone, state["backbone"])
    except DataError as error:
        raise DataError(
            f"{option} {path}: its weights do not fit the {info['backbone']} its record names ({error}); "
            f"the file is damaged or was edited: pretrain again, or pass another checkpoint"
        ) from error
    return backbone


def check_model_record(info: dict, path: str | Path, option: str = "checkpoint") -> dict:
    """Check the ``model`` entry of a checkpoint before anything is built or loaded from it.

    Returns:
        ``info``.

    Raises:
        DataError: no backbone name, or an image size outside ``MIN_IMAGE_SIZE..MAX_IMAGE_SIZE`` or a
            channel count below 1 (a damaged record: an image size of 100000 asked for 10 GB).

    Example::

        check_model_record(state["model"], "runs/pre/best.pt")
    """
    size, channels = info.get("image_size"), info.get("in_channels")
    if (
        not isinstance(info.get("backbone"), str)
        or not isinstance(size, int)
        or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE
        or not isinstance(channels, int)
        or channels < 1
    ):
        raise DataError(
            f"{option} {path}: its model record (backbone {info.get('backbone')!r}, image_size {size!r}, "
            f"in_channels {channels!r}) is not one of a model mtl trains (images of {MIN_IMAGE_SIZE} to "
            f"{MAX_IMAGE_SIZE} px, 1 or more channels); the file is damaged or was not written by mtl"
        )
    return info


def check_pretrain_checkpoint(state: dict, path: str | Path, option: str = "checkpoint") -> dict:
    """Check that ``state`` (from :func:`~mtl_plugin.utils.io.read_checkpoint`) is a pretrain ``best.pt``.

    The checks of :func:`read_pretrain_checkpoint`, for a file already read: ``mtl evaluate``
    reads its checkpoint before it knows the kind.

    Returns:
        ``state``.

    Raises:
        DataError: another kind of checkpoint, the resumable ``last.pt``, which holds no
            best backbone, or a damaged model record (:func:`check_model_record`).

    Example::

        state = check_pretrain_checkpoint(read_checkpoint("runs/pre/best.pt"), "runs/pre/best.pt")
    """
    if state["kind"] != CHECKPOINT_KIND:
        raise DataError(
            f"{option} {path}: a {state['kind']!r} checkpoint, not one of mtl pretrain; "
            f"give the best.pt written by mtl pretrain"
        )
    if "backbone" not in state:
        raise DataError(
            f"{option} {path}: the resumable state of mtl pretrain (last.pt), which holds no "
            f"best backbone; give best.pt from the same folder"
        )
    check_model_record(state["model"], path, option)
    return state


def read_pretrain_checkpoint(
    path: str | os.PathLike, option: str = "checkpoint", map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a pretraining ``best.pt`` safely and check it before anything is built from it.

    The file is loaded by :func:`~mtl_plugin.utils.io.read_checkpoint` (``weights_only=True``:
    nothing in it can run code) and checked by :func:`check_pretrain_checkpoint`. A checkpoint of
    an earlier version reads too: entries added since (``classes``) may be missing.

    Args:
        path: the ``best.pt`` written by :func:`~mtl_plugin.training.pretrain.pretrain` or ``mtl pretrain``.
        option: the argument (from ``mtl``, the flag) that named it, for the messages.
        map_location: where the tensors go (passed to ``torch.load``).

    Returns:
        The checkpoint: ``kind`` (``"pretrain"``), ``model`` (the checked model record),
        ``backbone`` (the best epoch's weights), ``config``, ``epoch``, ``val_accuracy`` and,
        where recorded, ``classes`` (the training classes, for the leak guard).

    Raises:
        MissingDataError: no file at ``path``.
        DataError: an unreadable, unsafe or non-finite file; another kind of checkpoint; the
            resumable ``last.pt``; or a damaged model record.

    Example::

        state = read_pretrain_checkpoint("runs/pre/best.pt")
        print(state["model"]["backbone"], state["val_accuracy"])
    """
    return check_pretrain_checkpoint(read_checkpoint(path, option, map_location), path, option)


def check_backbone_fits(info: dict, benchmark: Any, path: str | Path, option: str = "checkpoint") -> None:
    """Check that the images of ``benchmark`` have the shape the backbone described by ``info`` was trained on.

    Raises:
        DataError: other channels or image size; the message names the checkpoint's data set and size.

    Example::

        check_backbone_fits(state["model"], bench, "runs/pre/best.pt")
    """
    trained = (info["in_channels"], info["image_size"])
    if trained != (benchmark.channels, benchmark.image_size):
        name = info.get("data", {}).get("name") or "its data set"
        given = getattr(benchmark, "name", "the data set")
        raise DataError(
            f"{option} {path} was trained on {name} images of {trained[0]} x {trained[1]} px, but {given} gives "
            f"{benchmark.channels} x {benchmark.image_size} px: use data of the same shape "
            f"(e.g. --data {name} --image-size {trained[1]}) or a checkpoint trained on {given}"
        )


def load_pretrained(
    path: str | Path, map_location: Any = "cpu", *, benchmark: Any = None, allow_seen_classes: bool = False
) -> nn.Module:
    """The feature extractor saved in a pretrain ``best.pt``.

    Args:
        path: the ``best.pt`` written by :func:`pretrain` (or ``mtl pretrain``).
        map_location: where to load the weights.
        benchmark: the data the backbone is to be meta-trained or evaluated on: none of its val
            or test classes may be among the checkpoint's training classes
            (:func:`~mtl_plugin.data.leak.check_unseen`).
        allow_seen_classes: skip that check, for a deliberate transfer study.

    Returns:
        The backbone (no head), rebuilt by its recorded name, with the best epoch's weights.

    Raises:
        MissingDataError: no file at ``path``.
        DataError: an unreadable file, or not a pretrain ``best.pt``.
        ClassLeakError: the backbone was trained on a val or test class of ``benchmark``.

    Example::

        backbone = load_pretrained("runs/pretrain/best.pt", benchmark=get_benchmark("kanji"))
    """
    state = read_pretrain_checkpoint(path, map_location=map_location)
    if benchmark is not None:
        check_unseen(state.get("classes"), benchmark, f"checkpoint {path}", allow_seen_classes)
    return pretrained_backbone(state, path)
