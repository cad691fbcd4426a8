"""Atomic file writes: a reader (or a run killed with ``kill -9``) never sees half a file.

Example::

    from mtl_plugin.training.io import atomic_save, atomic_write_text
    atomic_save({"step": 10, "state": model.state_dict()}, "run/last.pt")
    atomic_write_text("run/results.csv", frame.to_csv(index=False))
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

import torch

from mtl_plugin.errors import OutputError

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_open", "atomic_save", "atomic_save_figure", "atomic_write_text", "atomic_write_bytes"]


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
        raise OutputError(f"{path}: could not be written ({reason}); the version there before, if any, is kept: "
                          f"free space on that disk (or write elsewhere) and run the command again (mtl pretrain "
                          f"and meta-train with --resume)") from error


def _write_failure(error: BaseException) -> Optional[str]:
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
