"""Mistakes a user can fix, as typed errors raised where they are found, and how ``mtl`` shows them.

Two kinds, both ``ValueError`` so that library code catching ``ValueError`` keeps working:

* :class:`UsageError`: a bad argument (a flag value, an unknown name, a device that is not
  there, an output folder that cannot be written). ``mtl`` prints one ``Error: ...`` line and
  exits with 2, as click does for a malformed flag.
* :class:`DataError`: the input files are missing, empty, damaged or of the wrong kind (a data
  set, a checkpoint). ``mtl`` prints one ``Error: ...`` line and exits with 1.
  :class:`MissingDataError` is also a ``FileNotFoundError``; :class:`OutputError` (an output
  file that could not be written, e.g. on a full disk) is also an ``OSError``.

A training run that diverges raises :class:`NonFiniteLossError` (also importable from
:mod:`mtl_plugin.training.run_log`), shown the same way (exit 1). Anything else is a bug and keeps its
traceback. The checks here run before any long work starts: :func:`check_device`,
:func:`check_output_dir`, :func:`check_output_file`, :func:`check_run_folder` and
:func:`read_checkpoint`.

Example::

    from mtl_plugin.errors import UsageError, check_device
    try:
        device = check_device("cuda")
    except UsageError as error:
        print(error)   # --device cuda: no CUDA GPU is visible to PyTorch here ...
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import click

if TYPE_CHECKING:
    import torch

__all__ = [
    "Command",
    "DataError",
    "Group",
    "INTERRUPTED_EXIT_CODE",
    "MAX_SEED",
    "SEED",
    "MissingDataError",
    "NonFiniteLossError",
    "OutputError",
    "UsageError",
    "check_device",
    "check_not_input",
    "check_seed",
    "check_run_folder",
    "check_output_dir",
    "check_output_file",
    "read_checkpoint",
]

PathLike = Union[str, os.PathLike]


# Seeds reach numpy's legacy seeding and learn2learn (below 2**32), and torch's generators after the
# loops derive their own from them (seed * 100_003 + epoch, plus a stride per rank), below 2**64.
MAX_SEED = 2**32 - 1
# The click type of every --seed and --data-seed: one range for every command.
SEED = click.IntRange(min=0, max=MAX_SEED)


class UsageError(ValueError):
    """A bad argument; the message names it and says what to pass instead (``mtl`` exit code 2)."""


class DataError(ValueError):
    """Missing, empty, damaged or unsuitable input files (``mtl`` exit code 1)."""


class MissingDataError(DataError, FileNotFoundError):
    """An input file or folder that is not there (also a ``FileNotFoundError``)."""


class OutputError(DataError, OSError):
    """An output file could not be written (a full disk, a quota, a read-only file system); the
    version there before is kept (``mtl`` exit code 1; also an ``OSError``)."""


class NonFiniteLossError(RuntimeError):
    """A training run diverged (a NaN, infinite or exploding loss or weight); its last good checkpoint was kept.

    Args:
        message: what diverged, where.
        settings: the hyper-parameters most likely to blame (config field names such as
            ``"inner_lr"``), most likely first; empty when no setting is to blame (e.g. NaN data).

    Example::

        raise NonFiniteLossError("the query loss is nan", settings=("encoder_lr", "head_lr"))
    """

    def __init__(self, message: str, settings: tuple[str, ...] = ()):
        super().__init__(message)
        self.settings = tuple(settings)


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


def check_device(name: str, option: str = "--device") -> torch.device:
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
            raise UsageError(f"{option} {name}: no CUDA GPU is visible to PyTorch here "
                             f"(torch.cuda.is_available() is False); use {option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise UsageError(f"{option} {name}: only cpu and cuda devices are supported; use cpu, cuda or auto")
    return device


def _write_test(folder: Path, option: str, shown: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{option} {shown}: cannot write there ({error.strerror or error}); "
                         f"pass a folder you can write to") from error


def check_output_dir(path: PathLike, option: str = "--out") -> Path:
    """Create the output folder ``path`` if needed and prove that a file can be written in it.

    Run before long work, so that a bad ``--out`` fails in a second, not at the first save.

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


def check_output_file(path: PathLike, option: str = "--out") -> Path:
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


def check_not_input(out: Optional[PathLike], inputs: dict, option: str = "--out") -> None:
    """Refuse an output path that is, or is a folder holding, one of the command's inputs.

    A run folder is replaced with ``--overwrite`` and a result file is written over whatever is
    at its path, so an output that holds an input would destroy what the command reads.

    Args:
        out: the output file or folder (``None``: no output, nothing to check).
        inputs: flag -> path of each input (``None`` values are skipped), e.g.
            ``{"--checkpoint": "m/best.pt"}``.
        option: the output's flag, for the message.

    Raises:
        UsageError: ``out`` is an input or holds one.

    Example::

        check_not_input("runs/pre", {"--pretrained": "runs/pre/best.pt"})   # UsageError
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
            raise UsageError(f"{option} {out} {what} the input {flag} {given}: writing there would replace what "
                             f"this command reads; pass another {option}")


def check_run_folder(out_dir: PathLike, resume: bool, overwrite: bool, run: str = "run") -> Optional[Path]:
    """Decide what a training command does with the run folder ``out_dir``: never overwrite by accident.

    A folder holds a run once it has ``last.pt`` or ``best.pt``. Without a run, or with
    ``overwrite`` (the caller then deletes the run's files), a new run starts; with ``resume``,
    the run continues from ``last.pt``.

    Args:
        out_dir: the run's folder (``--out``).
        resume: ``--resume`` was given.
        overwrite: ``--overwrite`` was given.
        run: what the folder holds, for the message (e.g. "pretraining run").

    Returns:
        The ``last.pt`` to resume from, or ``None`` to start a new run.

    Raises:
        UsageError: both flags; a run in ``out_dir`` and neither flag; a ``best.pt`` but no
            ``last.pt`` without ``overwrite``.

    Example::

        last = check_run_folder("runs/meta", resume=False, overwrite=False, run="meta-training run")
    """
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    out_dir = Path(out_dir)
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    if overwrite or not (last.is_file() or best.is_file()):
        return None
    if not last.is_file():
        # Said whether or not --resume was given: "pass --resume" would only lead here.
        raise UsageError(f"--out {out_dir} holds best.pt but no last.pt, so its run cannot be resumed: pass "
                         f"--overwrite to train anew there, or another --out")
    if not resume:
        raise UsageError(f"--out {out_dir} already holds a {run}: pass --resume to continue it (a finished one "
                         f"is reused), --overwrite to replace it, or another --out")
    return last


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else "no message"


def _first_non_finite(value: Any, name: str = "") -> Optional[str]:
    """The name of the first floating-point tensor in ``value`` (nested dicts, lists, tuples) that holds a
    NaN or an infinity, or ``None``."""
    import torch

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


def read_checkpoint(path: PathLike, option: str = "--checkpoint", map_location: Any = "cpu",
                    require_kind: bool = True) -> dict:
    """Load a checkpoint written by ``mtl``, turning every way a file can be wrong into a :class:`DataError`.

    The file is loaded with ``weights_only=True``: a file that holds anything but tensors,
    numbers, strings and plain containers is refused before any of its code can run.

    Args:
        path: the checkpoint file.
        option: the flag that named it, for the message.
        map_location: passed to ``torch.load``.
        require_kind: refuse a dict without the ``"kind"`` entry that the checkpoints of
            ``mtl pretrain`` and ``mtl meta-train`` have; ``False`` for any dict
            (:func:`mtl_plugin.training.run_log.load_checkpoint`).

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
    import torch

    path = Path(path).expanduser()
    # A run folder's last.pt (resumed through --out) is not replaced by giving another file.
    in_run_folder = option == "--out"
    start_anew = "pass --overwrite to train anew there, or another --out"
    complete = start_anew if in_run_folder else "give a complete best.pt written by mtl"
    if not path.is_file():
        raise MissingDataError(f"{option} {path}: no checkpoint there (no such file); give the best.pt "
                               f"written by mtl pretrain or mtl meta-train")
    if path.stat().st_size == 0:
        raise DataError(f"{option} {path}: the file is empty (0 bytes), e.g. a copy that failed; {complete}")
    with open(path, "rb") as handle:
        start = handle.read(4)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle); anything else is another
    # kind of file, on which torch.load fails in arbitrary ways.
    if not start.startswith((b"PK\x03\x04", b"\x80")):
        raise DataError(f"{option} {path}: not a PyTorch checkpoint (it starts with {start!r}, not a "
                        f"torch.save archive); give the best.pt written by mtl")
    try:
        # Ours hold tensors, numbers, strings and plain containers only (RNG states, configs,
        # metrics), which the safe unpickler accepts.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            # torch's message: a preamble, the refused object, a pointer to its docs; keep the middle.
            paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
            reason = " ".join(paragraphs[1:-1]) or "objects other than tensors"
            raise DataError(f"{option} {path}: refused, it holds Python objects that a safe load does not "
                            f"build ({reason}); checkpoints of mtl hold tensors only, so this file was not "
                            f"written by mtl: do not load it") from error
        raise DataError(f"{option} {path}: not a readable PyTorch checkpoint ({error}); "
                        f"give the best.pt written by mtl") from error
    except (EOFError, RuntimeError, KeyError, IndexError, ValueError) as error:
        # What torch.load raises on a truncated archive or damaged bytes.
        raise DataError(f"{option} {path}: not a readable PyTorch checkpoint, truncated or another kind of "
                        f"file ({type(error).__name__}: {_first_sentence(error)}); {complete}") from error
    if not isinstance(state, dict) or (require_kind and "kind" not in state):
        what = ("it has no 'kind' entry" if isinstance(state, dict)
                else f"it holds a {type(state).__name__}, not a dict")
        raise DataError(f"{option} {path}: a PyTorch file, but not a checkpoint written by mtl pretrain or "
                        f"mtl meta-train ({what})")
    broken = _first_non_finite(state)
    if broken is not None:
        # Every number computed from such weights is NaN or chance level: refuse rather than report it.
        remedy = start_anew if in_run_folder else "give the checkpoint of a run that did not diverge"
        raise DataError(f"{option} {path}: {broken} holds NaN or infinite values (the weights of a diverged or "
                        f"damaged run), so nothing computed from it is right; {remedy}")
    return state


# The shell's exit status of a process stopped by SIGINT (128 + 2), which scripts test for.
INTERRUPTED_EXIT_CODE = 130


class _Interrupted(click.ClickException):
    exit_code = INTERRUPTED_EXIT_CODE


def _interrupted(ctx: click.Context) -> _Interrupted:
    """The one line for a command stopped by Ctrl-C: what is kept and how to go on."""
    command = " ".join(ctx.command_path.split()[1:]) or ctx.command_path
    params = {param.name for param in ctx.command.params}
    if "resume" in params:
        hint = (f"the checkpoints already written in --out are kept; run the same mtl {command} command with "
                f"--resume to continue from the last one")
    elif command == "bench":
        hint = "the finished cells in --out are kept; run the same mtl bench command again to continue"
    else:
        hint = f"no result was written; run mtl {command} again"
    return _Interrupted(f"interrupted (Ctrl-C): {hint}")


class _ShowsUserErrors:
    """Turns the typed errors into click's: one ``Error: ...`` line and exit code 2 or 1 (130 for Ctrl-C)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as error:
            # No ctx: click then prints the one Error line without the usage block.
            raise click.UsageError(str(error)) from error
        except (DataError, NonFiniteLossError) as error:
            raise click.ClickException(str(error)) from error
        except KeyboardInterrupt as error:
            # Not click's bare "Aborted!" with exit 1, the code of bad data.
            raise _interrupted(ctx) from error


class Command(_ShowsUserErrors, click.Command):
    """A click command whose user mistakes end as one ``Error: ...`` line (exit 2 usage, 1 data).

    Example::

        @click.command("pretrain", cls=Command)
        def pretrain_command(...): ...
    """


class Group(_ShowsUserErrors, click.Group):
    """A click group that shows user mistakes like :class:`Command`, in itself and its subcommands.

    Example::

        @click.group(cls=Group)
        def main(): ...
    """

    command_class = Command
