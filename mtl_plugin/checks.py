"""Checks of arguments that run before any long work starts: seeds, devices, output paths.

Each raises :class:`~mtl_plugin.errors.UsageError` naming the argument; ``option`` names it as
the caller knows it: an argument name for the library, a flag for ``mtl`` (the commands pass
``"--device"``, ``"--out"``).

Example::

    from mtl_plugin.checks import check_device, check_output_dir
    device = check_device("auto")
    out = check_output_dir("runs/pretrain")
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtl_plugin.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_COUNT",
    "MAX_SEED",
    "check_device",
    "check_not_input",
    "check_output_dir",
    "check_output_file",
    "check_seed",
]

PathLike = str | os.PathLike

# Seeds reach numpy's legacy seeding and learn2learn (below 2**32), and torch's generators after the
# loops derive their own from them (seed * 100_003 + epoch, plus a stride per rank), below 2**64.
MAX_SEED = 2**32 - 1
# Counts (tasks, ways, shots, steps, batch sizes) reach learn2learn, numpy and itertools as C ints:
# a larger one failed deep inside them (OverflowError, or ValueError from islice) after work had run.
MAX_COUNT = 2**31 - 1


def check_seed(seed: Any, name: str = "seed") -> None:
    """Check that ``seed`` is a seed every generator ``mtl`` feeds accepts: an integer in 0..:data:`MAX_SEED`.

    Raises:
        UsageError: another type, or out of range (``PretrainConfig(seed=10**20)`` failed deep in
            torch with ``ValueError: Overflow``).

    Example::

        check_seed(config.seed)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{name}={seed!r}: a seed is an integer from 0 to {MAX_SEED}")


def check_device(name: str, option: str = "device") -> torch.device:
    """The ``torch.device`` for ``name`` ("cpu", "cuda", "cuda:N" or "auto"), if it exists here.

    Raises:
        UsageError: ``name`` is not a device name, or names a GPU this machine does not have.

    Example::

        device = check_device("auto")   # cuda if a GPU is visible, else cpu
    """
    # Imported here: the command line imports this module, and `mtl --help` should not load torch.
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"{option} {name!r}: not a device name; use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{option} {name}: no CUDA GPU is visible to PyTorch here "
                f"(torch.cuda.is_available() is False); use {option} cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        raise UsageError(f"{option} {name}: only cpu and cuda devices are supported; use cpu, cuda or auto")
    return device


def _write_test(folder: Path, option: str, shown: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(
            f"{option} {shown}: cannot write there ({error.strerror or error}); pass a folder you can write to"
        ) from error


def check_output_dir(path: PathLike, option: str = "out") -> Path:
    """Create the output folder ``path`` if needed and prove that a file can be written in it.

    Run before long work, so that a bad output folder fails in a second, not at the first save.

    Raises:
        UsageError: ``path`` is a file, or the folder cannot be created or written to.

    Example::

        out = check_output_dir("runs/pretrain")
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder; pass a folder (it is created if missing)")
    _write_test(path, option, path)
    return path


def check_output_file(path: PathLike, option: str = "out") -> Path:
    """Prove that the file ``path`` can be written (its folder is created if needed).

    Raises:
        UsageError: ``path`` is a folder, or its folder cannot be created or written to.

    Example::

        out = check_output_file("results/eval.json")
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; pass a file name, e.g. {path / 'result.json'}")
    _write_test(path.parent, option, path)
    return path


def check_not_input(out: PathLike | None, inputs: dict, option: str = "out") -> None:
    """Refuse an output path that is one of the command's inputs, holds one, or lies inside one.

    A run folder is replaced with ``overwrite`` and a result file is written over whatever is
    at its path, so an output that holds an input would destroy what the command reads; an
    output inside a data folder would add its files (a ``curve.png`` in a class folder) to the
    data every later command reads.

    Args:
        out: the output file or folder (``None``: no output, nothing to check).
        inputs: name -> path of each input (``None`` values are skipped), e.g.
            ``{"checkpoint": "m/best.pt"}`` (``mtl`` passes its flags, ``{"--checkpoint": ...}``).
        option: the output's name, for the message.

    Raises:
        UsageError: ``out`` is an input, holds one or is inside one.

    Example::

        check_not_input("runs/pre", {"pretrained": "runs/pre/best.pt"})   # UsageError
    """
    if out is None:
        return
    target = Path(out).expanduser().resolve()
    for flag, given in inputs.items():
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "holds"
            raise UsageError(
                f"{option} {out} {what} the input {flag} {given}: writing there would replace what "
                f"this command reads; pass another {option}"
            )
        if source in target.parents:
            raise UsageError(
                f"{option} {out} is inside the input {flag} {given}: its files would become part of "
                f"what this and later commands read; pass an {option} outside it"
            )
