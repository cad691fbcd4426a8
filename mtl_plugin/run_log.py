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
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from mtl_plugin.io import atomic_save, atomic_save_figure, atomic_write_text

PathLike = Union[str, os.PathLike]

__all__ = [
    "NonFiniteLossError",
    "RunLog",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the last good checkpoint was kept."""


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


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing.

    Example::

        state = load_checkpoint("runs/x/last.pt")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; check the path or run without --resume")
    # A checkpoint must not be able to run code: ours hold tensors, numbers, strings and plain
    # containers only (RNG states, configs, metrics), which the safe unpickler accepts.
    return torch.load(path, map_location=map_location, weights_only=True)


class RunLog:
    """The metrics of one run, kept in memory and rewritten atomically as CSV (and PNG).

    The rows travel inside each checkpoint, so a resumed run drops the rows that
    were logged after its last checkpoint and its CSV matches an uninterrupted run.

    Example::

        log = RunLog("runs/pretrain")
        log.append({"epoch": 1, "loss": 2.3, "val_accuracy": 40.0})
        log.write(curve=("epoch", "val_accuracy"))
    """

    def __init__(self, run_dir: PathLike, rows: Optional[list] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list = list(rows or [])

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

    def append(self, row: dict) -> None:
        """Add one row (a flat dict of numbers and strings)."""
        self.rows.append(dict(row))

    def write(self, curve: Optional[Tuple[str, str]] = None) -> None:
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
