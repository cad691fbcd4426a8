"""Meta-training checkpoints: the one reader (:func:`read_meta_checkpoint`) and a learner rebuilt from one.

A checkpoint of :func:`~mtl_plugin.training.meta_training.meta_train` holds the learner's weights,
its :class:`~mtl_plugin.meta_config.MetaTrainConfig` and the ``model_info`` it was given,
the *model record*: the backbone (``backbone``, ``in_channels``, ``image_size``, as
:func:`~mtl_plugin.training.pretrain_checkpoint.build_pretrained` reads them) and the encoder around it
(:func:`encoder_record`: ``encoder`` ``"ss"`` with the
:class:`~mtl_plugin.ss.SSConfig` fields, or ``"scratch"``). ``mtl meta-train``
writes that record; so can a script, and then ``mtl evaluate`` and :func:`load_learner`
rebuild its learner too.

:func:`read_meta_checkpoint` is the one reader of a meta-training checkpoint (``best.pt`` or
``last.pt``): :func:`load_learner`, :func:`~mtl_plugin.training.meta_training.meta_train` (its
best weights, at the end) and the benchmark scripts read one there. :func:`load_learner_weights`
is the one way its weights go into a learner: a rebuilt one (:func:`learner_from_checkpoint`),
or a run's own (meta_train's best, a resumed run's last). ``mtl evaluate``, which also takes a
pretraining ``best.pt``, reads its file once with :func:`~mtl_plugin.utils.io.read_checkpoint`
(``weights_only=True``, as under every reader here) and applies the same checks
(:func:`check_learner_checkpoint`) before it builds the learner; a run folder's ``last.pt`` is
read back by :func:`~mtl_plugin.training.run_log.previous_run`, which tells another command's run
from a damaged file. A pretraining ``best.pt`` has its own reader,
:func:`~mtl_plugin.training.pretrain_checkpoint.read_pretrain_checkpoint`.

Example::

    learner = load_learner("runs/meta/best.pt")
    logits = learner.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from mtl_plugin.data.leak import check_unseen
from mtl_plugin.errors import DataError
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.meta_transfer import MetaTransferLearner, load_learner_state
from mtl_plugin.ss import SSAdapter, SSConfig
from mtl_plugin.training.pretrain_checkpoint import build_pretrained, check_model_record
from mtl_plugin.utils.io import check_known_settings, read_checkpoint

__all__ = [
    "CHECKPOINT_KIND",
    "build_encoder",
    "check_learner_checkpoint",
    "encoder_record",
    "learner_from_checkpoint",
    "load_learner",
    "load_learner_weights",
    "read_meta_checkpoint",
]

# The "kind" entry of every meta-training checkpoint.
CHECKPOINT_KIND = "meta-transfer"
_SS_FIELDS = {f.name for f in fields(SSConfig)}


def encoder_record(ss: SSConfig | None) -> dict:
    """The model record's entries for an encoder: SS with ``ss``, or (``None``) the backbone itself, all learned.

    Example::

        model_info = {"backbone": "conv4", "in_channels": 1, "image_size": 28, **encoder_record(SSConfig.paper())}
        meta_train(learner, benchmark, "runs/meta", model_info=model_info)
    """
    return {"encoder": "ss", **ss.to_dict()} if ss is not None else {"encoder": "scratch"}


def build_encoder(record: dict) -> nn.Module:
    """The encoder a model record describes, before any weights are loaded into it.

    Records written before ``layers`` and ``output_scaling`` were recorded read as their
    defaults, as the encoder was then built.

    Raises:
        ValueError: SS options :class:`~mtl_plugin.ss.SSConfig` refuses.

    Example::

        encoder = build_encoder(read_meta_checkpoint("runs/meta/best.pt")["model"])
    """
    backbone = build_pretrained(record)
    if record.get("encoder") != "ss":
        return backbone
    ss = SSConfig.from_dict({name: value for name, value in record.items() if name in _SS_FIELDS}, "model record")
    return SSAdapter.from_config(backbone, ss)


def read_meta_checkpoint(
    path: str | os.PathLike, option: str = "checkpoint", map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a meta-training checkpoint (``best.pt`` or ``last.pt``) safely and check its kind.

    The file is loaded by :func:`~mtl_plugin.utils.io.read_checkpoint` (``weights_only=True``:
    nothing in it can run code). A checkpoint of an earlier version reads too: entries added
    since (``data``, ``classes``, the model record's SS fields) may be missing.

    Args:
        path: a checkpoint written by :func:`~mtl_plugin.training.meta_training.meta_train`
            or ``mtl meta-train``.
        option: the argument (from ``mtl``, the flag) that named it, for the messages; ``"--out"``
            for a file of the run folder being trained, which the remedies then name.
        map_location: where the tensors go (passed to ``torch.load``).

    Returns:
        The checkpoint: ``kind`` (``"meta-transfer"``), ``model`` (the ``model_info`` record,
        possibly empty), ``config``, ``iteration``, ``learner`` (the weights, for
        :func:`load_learner_weights`) and, where recorded, ``data`` and ``classes``; a
        ``last.pt`` also holds the optimiser, schedule, task streams and metrics to resume.

    Raises:
        MissingDataError: no file at ``path``.
        DataError: an unreadable, unsafe or non-finite file, or another kind of checkpoint.

    Example::

        state = read_meta_checkpoint("runs/meta/best.pt")
        print(state["iteration"], state["val_accuracy"])
    """
    state = read_checkpoint(path, option, map_location)
    _check_kind(state, path, option)
    return state


def _check_kind(state: dict, path: str | os.PathLike, argument: str) -> None:
    if state["kind"] != CHECKPOINT_KIND:
        raise DataError(
            f"{argument} {path}: a {state['kind']!r} checkpoint, not one of meta-training; give the "
            f"best.pt of meta_train (a pretraining best.pt loads with load_pretrained)"
        )


def check_learner_checkpoint(state: dict, path: str | os.PathLike, argument: str = "checkpoint") -> dict:
    """Check that ``state`` (from :func:`~mtl_plugin.utils.io.read_checkpoint`) is a meta-training
    checkpoint that records its model, before anything is built from it.

    Args:
        state: the checkpoint's contents.
        path: the file it was read from, for the messages.
        argument: the name the caller gave the file (``--checkpoint`` from ``mtl evaluate``).

    Returns:
        ``state``.

    Raises:
        DataError: not a meta-training checkpoint, one without a model record, or a damaged record.

    Example::

        state = check_learner_checkpoint(read_checkpoint("runs/meta/best.pt"), "runs/meta/best.pt")
    """
    _check_kind(state, path, argument)
    return _check_recorded_model(state, path, argument)


def _check_recorded_model(state: dict, path: str | os.PathLike, argument: str) -> dict:
    """``state``, once its model record is checked to be one the learner can be rebuilt from."""
    if "backbone" not in state["model"]:
        raise DataError(
            f"{argument} {path} does not record its model: meta_train wrote it without model_info, so "
            f"the file alone cannot rebuild the learner; give the best.pt of a meta_train run given "
            f"model_info, as mtl meta-train gives it (see load_learner)"
        )
    check_model_record(state["model"], path, argument)
    return state


def load_learner_weights(
    learner: MetaTransferLearner, state: dict[str, Any], path: str | os.PathLike, option: str = "checkpoint"
) -> None:
    """Load the learner weights of a meta-training checkpoint into ``learner``, every name and shape checked first.

    Args:
        learner: the learner to load into, built for the checkpoint's model.
        state: the checkpoint (:func:`read_meta_checkpoint`).
        path: the file it was read from, for the messages.
        option: the argument (from ``mtl``, the flag) that named it; with ``"--out"`` the message
            says how to start the run anew.

    Raises:
        DataError: a tensor missing, extra or of another shape: the checkpoint was written for
            another architecture, SS granularity or number of ways. The message names the file and
            the first such tensor.

    Example::

        load_learner_weights(learner, read_meta_checkpoint("runs/meta/best.pt"), "runs/meta/best.pt")
    """
    try:
        load_learner_state(learner, state["learner"], f"{option} {path}")
    except ValueError as error:
        # A run folder's checkpoint cannot be given again otherwise: it is replaced, or the run moves.
        remedy = "; pass --overwrite to train anew there, or another --out" if option == "--out" else ""
        raise DataError(f"{error}{remedy}") from error


def learner_from_checkpoint(state: dict, path: str | os.PathLike, argument: str = "checkpoint") -> MetaTransferLearner:
    """The learner a checked meta-training checkpoint (:func:`check_learner_checkpoint`) holds, on the CPU.

    Args:
        state: the checkpoint's contents.
        path: the file it was read from, for the messages.
        argument: the name the caller gave the file.

    Returns:
        The learner, its encoder rebuilt by the model record and its config the saved one.

    Raises:
        DataError: a model record mtl cannot build, or weights that do not fit it.

    Example::

        state = check_learner_checkpoint(read_checkpoint("runs/meta/best.pt"), "runs/meta/best.pt")
        learner = learner_from_checkpoint(state, "runs/meta/best.pt")
    """
    # Checkpoints written before head_init existed hold the official code's Kaiming head.
    config = MetaTrainConfig(
        **{"head_init": "kaiming", **check_known_settings(MetaTrainConfig, state["config"], path, argument)}
    )
    try:
        encoder = build_encoder(state["model"])
    except ValueError as error:
        raise DataError(
            f"{argument} {path}: its model record is not one mtl builds ({error}); the file is "
            f"damaged or was written by another version of mtl"
        ) from error
    learner = MetaTransferLearner(encoder, config.ways, config)
    load_learner_weights(learner, state, path, argument)
    return learner


def load_learner(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    argument: str = "checkpoint",
    *,
    benchmark: Any = None,
    allow_seen_classes: bool = False,
) -> MetaTransferLearner:
    """The learner a meta-training checkpoint (``best.pt`` or ``last.pt``) was written by, with its weights.

    Args:
        path: a checkpoint of ``mtl meta-train``, or of :func:`~mtl_plugin.training.meta_training.meta_train`
            given a ``model_info`` record (see the module's docstring).
        device: where the learner goes.
        argument: the name the caller gave ``path``, for the messages.
        benchmark: the data the learner is to be evaluated on: none of its val or test classes
            may be among the checkpoint's training classes (:func:`~mtl_plugin.data.leak.check_unseen`).
        allow_seen_classes: skip that check, for a deliberate transfer study.

    Returns:
        The learner, its encoder rebuilt by the record (the backbone by name, SS with the
        saved :class:`~mtl_plugin.ss.SSConfig`) and its config the saved one.

    Raises:
        MissingDataError: no file at ``path``.
        DataError: an unreadable or unsafe file, not a meta-training checkpoint, one without a
            model record, or weights that do not fit the recorded model.
        ClassLeakError: the learner was trained on a val or test class of ``benchmark``.

    Example::

        benchmark = get_benchmark("kanji")
        learner = load_learner("runs/meta/best.pt", device="cuda", benchmark=benchmark)
        result = evaluate(learner.predict, benchmark.test, EvaluationConfig(shots=1))
    """
    state = _check_recorded_model(read_meta_checkpoint(path, argument), path, argument)
    if benchmark is not None:
        check_unseen(state.get("classes"), benchmark, f"{argument} {path}", allow_seen_classes)
    return learner_from_checkpoint(state, path, argument).to(device)
