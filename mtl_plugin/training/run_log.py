"""What a long run leaves on disk: a metrics CSV, a curve PNG and resumable checkpoints.

A run folder holds ``metrics.csv`` (one row per logged step), ``curve.png``
(validation accuracy against the step), ``last.pt`` (everything needed to
resume) and ``best.pt`` (the best weights so far). Every file is written
atomically, so a run killed with ``kill -9`` leaves the previous version whole.

Example::

    log = RunLog("runs/meta")
    log.append({"iteration": 100, "val_accuracy": 61.2})
    log.write(curve=("iteration", "val_accuracy"))
    state = {"rng": capture_rng_state([task_rng]), "metrics": log.rows}
    save_checkpoint(state, log.last_path)

A run folder is held by one process at a time (:func:`hold_run_folder`, an OS file lock that
dies with its process). The training commands share the rules of a run folder here:
:func:`previous_run` (continue,
replace or refuse), :func:`check_same_run` (a resumed run keeps its data, model and
experiment settings), :func:`fast_forward` (a schedule rebuilt under a new lr) and
:func:`all_finite` with :data:`DIVERGENCE_FACTOR` (divergence checks).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from mtl_plugin.checks import check_output_dir
from mtl_plugin.errors import DataError, NonFiniteLossError, UsageError
from mtl_plugin.utils import distributed
from mtl_plugin.utils.io import atomic_save, atomic_save_figure, atomic_write_text, read_checkpoint

PathLike = str | os.PathLike

__all__ = [
    "DIVERGENCE_FACTOR",
    "NonFiniteLossError",
    "RunLog",
    "all_finite",
    "capture_rng_state",
    "check_run_folder",
    "check_same_run",
    "LOCK_FILE",
    "fast_forward",
    "hold_run_folder",
    "previous_run",
    "restore_rng_state",
    "save_checkpoint",
]

# Cross-entropy starts near ln(classes), chance level. A loss a hundred times that means logits
# wrong by hundreds: the optimiser has diverged and no later step brings it back.
DIVERGENCE_FACTOR = 100.0
# The file a run folder's lock is taken on (hidden: it is not part of the run).
LOCK_FILE = ".mtl-run.lock"
# The run folders this process holds: resolved folder -> the descriptor of its lock file.
_HELD: dict = {}


def capture_rng_state(rngs: Sequence[random.Random] = ()) -> dict:
    """The states of torch's generators and of the given ``random.Random`` objects.

    Example::

        state = capture_rng_state([taskset_rng])
        ...
        restore_rng_state(state, [taskset_rng])
    """
    state = {"torch": torch.get_rng_state(), "python": [rng.getstate() for rng in rngs]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, rngs: Sequence[random.Random] = ()) -> None:
    """Put back what :func:`capture_rng_state` saved, in the same order of ``rngs``.

    Example::

        restore_rng_state(checkpoint["rng"], [taskset_rng])
    """
    if len(state["python"]) != len(rngs):
        raise ValueError(
            f"the checkpoint holds {len(state['python'])} task-sampler generators but the run has "
            f"{len(rngs)}; resume with the same options (e.g. --hard-tasks) as the original run"
        )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for rng, rng_state in zip(rngs, state["python"]):
        rng.setstate(rng_state)


def save_checkpoint(state: dict, path: PathLike) -> None:
    """``torch.save`` ``state`` to ``path`` atomically.

    Example::

        save_checkpoint({"iteration": 10, "model": model.state_dict()}, "runs/x/last.pt")
    """
    atomic_save(state, path)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point value of ``tensors`` is finite (``True`` for none).

    One reduction per tensor and a single device sync; a sum that overflows counts as
    divergence too.

    Example::

        if not all_finite(model.state_dict().values()): ...
    """
    sums = [t.detach().float().sum() for t in tensors if t.is_floating_point()]
    return not sums or bool(torch.stack(sums).isfinite().all())


def fast_forward(scheduler: Any, steps: int) -> None:
    """Step a freshly built lr ``scheduler`` ``steps`` times, to where a resumed run had brought its own.

    Stepping from scratch repeats the float operations of an uninterrupted run, so the lr
    matches it bit for bit, and a schedule rebuilt under a new lr continues from the same step.

    Example::

        fast_forward(torch.optim.lr_scheduler.StepLR(optimizer, 1000), state["scheduler"]["last_epoch"])
    """
    # torch warns that no optimiser step came first, which is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(steps):
            scheduler.step()


def _lock(folder: Path, option: str) -> int | None:
    """Take the lock of ``folder`` without waiting; return the descriptor that holds it, or ``None``
    (with a warning) where the file system has no locks."""
    import fcntl

    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise UsageError(
                f"{option} {folder}: cannot write there ({error.strerror or error}); pass a folder you can write to"
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(
                f"{option} {folder} is in use by another mtl run (process {holder or 'unknown'}); "
                f"wait for it to end, or pass another {option}"
            ) from None
        except OSError as error:
            os.close(fd)
            # Some network and cluster file systems refuse flock (e.g. Lustre mounted noflock): refusing
            # to run there at all would cost more than the race the lock guards against.
            warnings.warn(
                f"{option} {folder}: cannot lock {path} ({error.strerror or error}), so nothing stops "
                f"another run from writing there at the same time; start one run per folder",
                stacklevel=4,
            )
            return None
        # The previous holder removes the file as it lets go: if it did so after our open, the lock is on a
        # file no one else will find, so take it again on the file that is there now.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _remove_leftovers(folder: Path) -> None:
    # The temporary files of atomic writes (mtl_plugin.utils.io.atomic_open: ".<name>.<random>.tmp") that a
    # killed process left; with the folder held, no writer of this folder is alive.
    for path in folder.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)


@contextmanager
def hold_run_folder(out_dir: PathLike, option: str = "out_dir") -> Iterator[Path]:
    """Hold the run folder ``out_dir`` for the duration of the block: a second run there is refused at once.

    The folder is created if needed (and removed if the block leaves it empty, e.g. a run
    refused on its data) and locked with ``flock`` on its :data:`LOCK_FILE`; the
    operating system releases the lock when the process ends, however it ends (``kill -9``
    included). Nested holds of the same folder in one process (the command line, then the
    library function it calls) share the lock. On taking it, the temporary files of atomic
    writes that a killed run left behind are removed. Under ``torchrun`` rank 0 holds the
    folder for the job (the other ranks only read it). On a file system without locks the
    run goes on unheld, with a warning.

    Args:
        out_dir: the run folder.
        option: its name, for the messages (``mtl`` passes its flag, ``"--out"``).

    Returns:
        The folder, as a ``Path``.

    Raises:
        UsageError: another process holds the folder, or it cannot be created or written.

    Warns:
        UserWarning: the file system refuses the lock.

    Example::

        with hold_run_folder("runs/meta"):
            meta_train(learner, bench, "runs/meta")
    """
    folder = Path(out_dir).expanduser()
    if not distributed.is_main():
        yield folder
        return
    created = not folder.exists()
    check_output_dir(folder, option)
    key = folder.resolve()
    if key in _HELD:
        # Held by an enclosing block of this process, which lets it go.
        yield folder
        return
    fd = _lock(key, option)
    _HELD[key] = fd
    try:
        if fd is not None:
            _remove_leftovers(key)
        yield folder
    finally:
        del _HELD[key]
        if fd is not None:
            # Removed while still locked (see _lock), so that a finished run leaves no lock file behind.
            (key / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)
        if created:
            # A run refused before it wrote anything leaves no empty folder (rmdir fails on any file).
            with suppress(OSError):
                key.rmdir()


def previous_run(out_dir: PathLike, resume: bool, overwrite: bool, kind: str, command: str, run: str) -> dict | None:
    """The ``last.pt`` state a training command continues from, or ``None`` to start a new run in ``out_dir``.

    Args:
        out_dir: the run's folder (``--out``).
        resume: ``--resume`` was given.
        overwrite: ``--overwrite`` was given (the caller deletes the old run's files).
        kind: the ``"kind"`` entry of the command's checkpoints.
        command: the command, for the messages (``"mtl meta-train"``).
        run: what its folder holds, for the messages (``"meta-training run"``).

    Raises:
        UsageError: as :func:`check_run_folder`; without ``overwrite``, a
            ``last.pt`` of another command.
        DataError: ``last.pt`` is unreadable, or not the resumable state of ``command``.

    Example::

        state = previous_run("runs/meta", resume=True, overwrite=False, kind="meta-transfer",
                             command="mtl meta-train", run="meta-training run")
    """
    last_path = Path(out_dir) / "last.pt"
    state = read_checkpoint(last_path, "--out") if last_path.is_file() and not overwrite else None
    if state is not None and state["kind"] != kind:
        # Said first: "pass --resume" would only lead to "not the resumable state of" this command.
        raise UsageError(
            f"--out {out_dir} holds a run of another command ({state['kind']!r} checkpoints), not a "
            f"{run}: pass another --out, or --overwrite to replace it"
        )
    last = check_run_folder(out_dir, resume, overwrite, run=run)
    if last is None:
        return None
    # best.pt holds weights only; the resumable state also holds the optimiser's.
    if "optimizer" not in state:
        raise DataError(
            f"--out {out_dir}: its last.pt is not the resumable state of {command}; "
            f"pass --overwrite to train anew there, or another --out"
        )
    return state


def _short(value: Any) -> str:
    # Content digests are 64 hex digits: a few tell two data sets apart.
    return repr(value[:12] + "...") if isinstance(value, str) and len(value) > 24 else repr(value)


def _differences(saved: dict, now: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """The entries that differ (shown as ``key old (now new)``), and those ``saved`` does not record."""
    shown, unrecorded = [], []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if key not in saved:
            unrecorded.append(f"{prefix}{key}")
        elif isinstance(old, dict) and isinstance(new, dict):
            inner = _differences(old, new, f"{prefix}{key}.")
            shown, unrecorded = shown + inner[0], unrecorded + inner[1]
        elif old != new:
            shown.append(f"{prefix}{key} {_short(old)} (now {_short(new)})")
    return shown, unrecorded


def check_same_run(
    path: PathLike,
    saved_identity: dict,
    identity: dict,
    saved_config: dict,
    config: dict,
    may_change: Iterable[str],
    override: bool,
) -> None:
    """Refuse to resume the run saved at ``path`` under other data, another model or other settings.

    Args:
        path: the run's ``last.pt``, for the messages.
        saved_identity: what the data and the model were (names, sizes, the data set's record).
        identity: the same for the run about to continue.
        saved_config: the saved run's settings (a config dataclass as a dict).
        config: the settings given now.
        may_change: settings that may differ without ``override`` (e.g. learning rates).
        override: continue under settings (not data or model) that differ.

    Raises:
        DataError: other data or another model; or a checkpoint of an older ``mtl`` that did
            not record part of ``identity``, at any depth (e.g. ``data.content``; allowed with
            ``override``).
        UsageError: a setting outside ``may_change`` differs and ``override`` is off.

    Example::

        check_same_run(last, state["model"], info, state["config"], asdict(config), ("lr",), override=False)
    """
    different, unrecorded = _differences(saved_identity, identity)
    if different:
        raise DataError(
            f"{path} was written for other data or another model: {', '.join(different)}; give "
            f"the data and model flags of that run, --overwrite to train anew, or another --out"
        )
    if unrecorded and not override:
        raise DataError(
            f"{path} was written by an older mtl that did not record its {', '.join(unrecorded)}, so "
            f"resuming cannot check that they are the same: pass --override to resume it anyway, "
            f"--overwrite to train anew, or another --out"
        )
    changed = [k for k, v in config.items() if k not in may_change and saved_config.get(k) != v]
    if changed and not override:
        shown = ", ".join(f"{k} {saved_config.get(k)!r} -> {config[k]!r}" for k in changed)
        raise UsageError(
            f"{path}: resuming with other settings than the saved run's ({shown}) changes the "
            f"experiment: drop those flags, pass --override to continue under the new ones, "
            f"--overwrite to train anew, or another --out"
        )


class RunLog:
    """The metrics of one run, kept in memory and rewritten atomically as CSV (and PNG).

    The rows travel inside each checkpoint, so a resumed run drops the rows that
    were logged after its last checkpoint and its CSV matches an uninterrupted run.

    Example::

        log = RunLog("runs/pretrain")
        log.append({"epoch": 1, "loss": 2.3, "val_accuracy": 40.0})
        log.write(curve=("epoch", "val_accuracy"))
    """

    def __init__(
        self, run_dir: PathLike, rows: list | None = None, replaces: bool = False, other_files: Sequence[str] = ()
    ):
        """
        Args:
            run_dir: the run's folder (created if missing).
            rows: metrics logged before, e.g. by the run being resumed.
            replaces: this run replaces the one in ``run_dir``; the old run's files (its
                checkpoints, CSV, PNG and ``other_files``) stay until :meth:`drop_replaced_run`.
            other_files: names of the run's other files in ``run_dir``.
        """
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list = list(rows or [])
        self._replaced: list[Path] = (
            [
                self.last_path,
                self.best_path,
                self.csv_path,
                self.curve_path,
                *(self.run_dir / name for name in other_files),
            ]
            if replaces
            else []
        )

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    @property
    def curve_path(self) -> Path:
        return self.run_dir / "curve.png"

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def drop_replaced_run(self) -> None:
        """Remove the files of the run this one replaces; call it right before writing this run's
        checkpoints (``last.pt`` first), so that the old run stays whole until this one can take its
        place and no moment leaves a resumable mix of the two. Does nothing after the first call.
        """
        for path in self._replaced:
            path.unlink(missing_ok=True)
        self._replaced = []

    def append(self, row: dict) -> None:
        """Add one row (a flat dict of numbers and strings)."""
        self.rows.append(dict(row))

    def write(self, curve: tuple[str, str] | None = None) -> None:
        """Rewrite the CSV, and the PNG of ``curve = (x column, y column)`` if given."""
        import pandas as pd

        atomic_write_text(self.csv_path, pd.DataFrame(self.rows).to_csv(index=False))
        if curve is not None:
            self._plot(*curve)

    def _plot(self, x: str, y: str) -> None:
        points = [(row[x], row[y]) for row in self.rows if row.get(y) is not None and row[y] == row[y]]
        if not points:
            return
        # The Figure API needs no pyplot backend, so this works headless and leaves global state alone.
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4))
        axes = figure.subplots()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axes.set_xlabel(x)
        axes.set_ylabel(y)
        axes.grid(True, alpha=0.3)
        atomic_save_figure(figure, self.curve_path, dpi=100)


def _stopped_at_first_write(best: Path) -> bool:
    """Whether ``best.pt`` is all that a run's first checkpoint left: of pretraining's epoch 1 or
    meta-training's iteration 0, with no ``metrics.csv`` yet (written after ``last.pt``), unlike a
    finished run whose ``last.pt`` was deleted."""
    if (best.parent / "metrics.csv").exists():
        return False
    state = read_checkpoint(best, "--out")
    return state.get("epoch") == 1 or state.get("iteration") == 0


def check_run_folder(out_dir: PathLike, resume: bool, overwrite: bool, run: str = "run") -> Path | None:
    """Decide what a training command does with the run folder ``out_dir``: never overwrite by accident.

    A folder holds a run once it has ``last.pt`` or ``best.pt``. Without a run, or with
    ``overwrite`` (the caller then deletes the run's files), a new run starts; with ``resume``,
    the run continues from ``last.pt``. A ``best.pt`` of a run's first checkpoint (epoch 1,
    iteration 0) without ``last.pt`` or ``metrics.csv`` is a run killed between its first two
    writes: it starts anew, with or without ``resume``, and its first checkpoint replaces that
    ``best.pt``.

    Args:
        out_dir: the run's folder (``--out``).
        resume: ``--resume`` was given.
        overwrite: ``--overwrite`` was given.
        run: what the folder holds, for the message (e.g. "pretraining run").

    Returns:
        The ``last.pt`` to resume from, or ``None`` to start a new run.

    Raises:
        UsageError: both flags; a run in ``out_dir`` and neither flag; a ``best.pt`` of a later
            checkpoint but no ``last.pt``, without ``overwrite``.

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
        if _stopped_at_first_write(best):
            warnings.warn(
                f"--out {out_dir} holds only the best.pt of a run stopped between its first two "
                f"writes: starting that run anew there",
                stacklevel=2,
            )
            return None
        # Said whether or not --resume was given: "pass --resume" would only lead here.
        raise UsageError(
            f"--out {out_dir} holds best.pt but no last.pt, so its run cannot be resumed: pass "
            f"--overwrite to train anew there, or another --out"
        )
    if not resume:
        raise UsageError(
            f"--out {out_dir} already holds a {run}: pass --resume to continue it (a finished one "
            f"is reused), --overwrite to replace it, or another --out"
        )
    return last
