"""Checkpoint I/O: atomic file writes (a reader, or a run killed with ``kill -9``, never sees half a
file), :func:`reserved_output` (an output's room on disk taken before the work that computes it)
and :func:`read_checkpoint`, the low-level safe reader under every checkpoint ``mtl`` loads. A
pretraining or meta-training checkpoint is read through its kind's reader, which also checks
what it holds (:func:`~mtl_plugin.training.pretrain_checkpoint.read_pretrain_checkpoint`,
:func:`~mtl_plugin.training.checkpoints.read_meta_checkpoint`).

Example::

    from mtl_plugin.utils.io import atomic_save, atomic_write_text, read_checkpoint
    atomic_save({"step": 10, "state": model.state_dict()}, "run/last.pt")
    atomic_write_text("run/results.csv", frame.to_csv(index=False))
    state = read_checkpoint("run/last.pt", require_kind=False)
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from mtl_plugin.errors import DataError, MissingDataError, OutputError

PathLike = str | os.PathLike

__all__ = [
    "atomic_open",
    "atomic_save",
    "atomic_save_figure",
    "atomic_write_text",
    "atomic_write_bytes",
    "check_known_settings",
    "read_checkpoint",
    "reserved_output",
]


def _umask() -> int:
    # The umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    Raises:
        OutputError: the file system refused the bytes (full disk, quota, read-only): ``path``
            is left as it was and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is atomic only within one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; the finished file gets what open() would give, the user's umask.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = _write_failure(error)
        if reason is None:
            raise
        raise _output_error(path, reason) from error


def _output_error(path: Path, reason: str) -> OutputError:
    return OutputError(
        f"{path}: could not be written ({reason}); the version there before, if any, is kept: "
        f"free space on that disk (or write elsewhere) and run the command again (mtl pretrain "
        f"and meta-train with --resume)"
    )


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of disk to the open file ``fd`` (its content: zeros)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except AttributeError:
        pass  # not on this platform (macOS)
    except OSError as error:
        # A file system without fallocate; any other error is the disk's answer.
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    # Written zeros take the room on any file system.
    os.pwrite(fd, bytes(size), 0)
    os.fsync(fd)


@contextmanager
def reserved_output(path: PathLike, size: int) -> Iterator[Callable[[str], None]]:
    """Take ``size`` bytes of disk for ``path`` now, for a text that the block computes and writes at its end.

    Lets a long computation whose result is small fail on a full disk before it starts rather
    than after: the bytes are allocated to a temporary file beside ``path``, which the text
    then overwrites and which replaces ``path`` in one rename, as :func:`atomic_open` does.

    Args:
        path: the output file.
        size: bytes to reserve; a text as long or shorter needs no more room.

    Yields:
        ``write(text)``: writes ``text`` (UTF-8) to ``path``; call it once, at the block's end.
        A block left without it, or by an exception, leaves ``path`` as it was.

    Raises:
        OutputError: the file system refused the bytes, now or in ``write`` (full disk, quota,
            read-only); ``path`` is left as it was.

    Example::

        with reserved_output("result.json", 64 * 1024) as write:
            result = evaluate(...)   # hours, on a disk that had room when it started
            write(json.dumps(result.as_dict()))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = False

    def write(text: str) -> None:
        nonlocal written
        data = text.encode("utf-8")
        try:
            # Into the reserved bytes, then cut to the text's length: no new room is asked for.
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
            os.replace(tmp, path)
        except OSError as error:
            raise _output_error(path, error.strerror or str(error)) from error
        written = True

    try:
        try:
            # mkstemp creates 0600; the finished file gets what open() would give, the user's umask.
            os.chmod(tmp, 0o666 & ~_umask())
            _reserve(fd, size)
        except OSError as error:
            raise _output_error(path, error.strerror or str(error)) from error
        yield write
    finally:
        os.close(fd)
        if not written and os.path.exists(tmp):
            os.unlink(tmp)


def _write_failure(error: BaseException) -> str | None:
    """Why writing failed, if ``error`` says the file system refused the bytes (full, quota, read-only)."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    # torch.save's zip writer reports a short write as a RuntimeError ("[enforce fail at
    # inline_container.cc:...] unexpected pos ..." or "PytorchStreamWriter failed writing file ...").
    text = str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "the checkpoint writer stopped short, e.g. on a full disk: " + text.strip().splitlines()[0]
    return None


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(figure: Any, path: PathLike, dpi: int = 120) -> None:
    """Write a matplotlib ``Figure`` to ``path`` as PNG atomically."""
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else "no message"


def _first_non_finite(value: Any, name: str = "") -> str | None:
    """The name of the first floating-point tensor in ``value`` (nested dicts, lists, tuples) that holds a
    NaN or an infinity, or ``None``."""
    if isinstance(value, torch.Tensor):
        return name if value.is_floating_point() and not bool(value.isfinite().all()) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def read_checkpoint(
    path: PathLike, option: str = "checkpoint", map_location: Any = "cpu", require_kind: bool = True
) -> dict:
    """Load a checkpoint written by ``mtl``, turning every way a file can be wrong into a :class:`DataError`.

    The file is loaded with ``weights_only=True``: a file that holds anything but tensors,
    numbers, strings and plain containers is refused before any of its code can run.

    Args:
        path: the checkpoint file.
        option: the argument (or, from ``mtl``, the flag) that named it, for the message.
        map_location: passed to ``torch.load``.
        require_kind: refuse a dict without the ``"kind"`` entry that the checkpoints of
            ``mtl pretrain`` and ``mtl meta-train`` have; ``False`` for any dict (an adapter's
            SS weights, the bench's episodic checkpoints).

    Returns:
        The checkpoint's dict; with ``require_kind`` it has a ``"kind"`` entry (``"pretrain"``,
        ``"meta-transfer"``).

    Raises:
        MissingDataError: no file at ``path``.
        DataError: an empty, truncated or non-PyTorch file, a file refused by the safe loader,
            (with ``require_kind``) a PyTorch file that ``mtl`` did not write, or a floating-point
            tensor holding a NaN or an infinity.

    Example::

        state = read_checkpoint("runs/meta/best.pt")
        print(state["kind"])
    """
    path = Path(path).expanduser()
    # A run folder's last.pt (resumed through --out) is not replaced by giving another file.
    in_run_folder = option == "--out"
    start_anew = "pass --overwrite to train anew there, or another --out"
    complete = start_anew if in_run_folder else "give a complete best.pt written by mtl"
    if not path.is_file():
        raise MissingDataError(
            f"{option} {path}: no checkpoint there (no such file); give the best.pt "
            f"written by mtl pretrain or mtl meta-train"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{option} {path}: the file is empty (0 bytes), e.g. a copy that failed; {complete}")
    with open(path, "rb") as handle:
        start = handle.read(4)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle); anything else is another
    # kind of file, on which torch.load fails in arbitrary ways.
    if not start.startswith((b"PK\x03\x04", b"\x80")):
        raise DataError(
            f"{option} {path}: not a PyTorch checkpoint (it starts with {start!r}, not a "
            f"torch.save archive); give the best.pt written by mtl"
        )
    try:
        # Ours hold tensors, numbers, strings and plain containers only (RNG states, configs,
        # metrics), which the safe unpickler accepts.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            # torch's message: a preamble, the refused object, a pointer to its docs; keep the middle.
            paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
            reason = " ".join(paragraphs[1:-1]) or "objects other than tensors"
            raise DataError(
                f"{option} {path}: refused, it holds Python objects that a safe load does not "
                f"build ({reason}); checkpoints of mtl hold tensors only, so this file was not "
                f"written by mtl: do not load it"
            ) from error
        raise DataError(
            f"{option} {path}: not a readable PyTorch checkpoint ({error}); give the best.pt written by mtl"
        ) from error
    except (EOFError, RuntimeError, KeyError, IndexError, ValueError) as error:
        # What torch.load raises on a truncated archive or damaged bytes.
        raise DataError(
            f"{option} {path}: not a readable PyTorch checkpoint, truncated or another kind of "
            f"file ({type(error).__name__}: {_first_sentence(error)}); {complete}"
        ) from error
    if not isinstance(state, dict) or (require_kind and "kind" not in state):
        what = "it has no 'kind' entry" if isinstance(state, dict) else f"it holds a {type(state).__name__}, not a dict"
        raise DataError(
            f"{option} {path}: a PyTorch file, but not a checkpoint written by mtl pretrain or mtl meta-train ({what})"
        )
    broken = _first_non_finite(state)
    if broken is not None:
        # Every number computed from such weights is NaN or chance level: refuse rather than report it.
        remedy = start_anew if in_run_folder else "give the checkpoint of a run that did not diverge"
        raise DataError(
            f"{option} {path}: {broken} holds NaN or infinite values (the weights of a diverged or "
            f"damaged run), so nothing computed from it is right; {remedy}"
        )
    return state


def check_known_settings(config_class: type, record: dict, path: str | os.PathLike, option: str = "checkpoint") -> dict:
    """Refuse a saved config with settings ``config_class`` (a dataclass) does not have.

    A checkpoint written by a newer version of the package can record settings this one does not
    know; building the config from it would fail deep inside with a ``TypeError``.

    Returns:
        ``record``.

    Raises:
        DataError: naming the file, the unknown settings and what to do.

    Example::

        config = MetaTrainConfig(**check_known_settings(MetaTrainConfig, state["config"], path))
    """
    unknown = sorted(set(record) - {field.name for field in dataclasses.fields(config_class)})
    if unknown:
        raise DataError(
            f"{option} {path} records settings this version of mtl-plugin does not know "
            f"({', '.join(unknown[:5])}): a newer version wrote it; upgrade mtl-plugin to read it, "
            f"or pass a checkpoint written by this version"
        )
    return record
