"""Episodic training shared by the methods trained from scratch (protonet-conv4, maml, metanet).

Time-bounded (an episode limit and/or a wall-clock budget), checkpointed atomically in the
method's work folder, and resumable: a killed bench continues, a finished fit is reused.

Example::

    from mtl_plugin.methods.episodic import train_episodes
    losses = train_episodes(step, lambda offset: build_taskset(train, 5, 1, 15, seed=offset),
                            {"model": model, "optimizer": optimizer}, work_dir / "checkpoint.pt",
                            fingerprint={"config": asdict(config)}, max_episodes=1000)
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from mtl_plugin.io import atomic_save
from mtl_plugin.tasks import build_taskset

__all__ = ["fit_episodically", "train_episodes"]


def train_episodes(
    step: Callable[[Any], float],
    make_tasks: Callable[[int], Any],
    state: dict[str, Any],
    checkpoint: Path,
    fingerprint: dict,
    max_episodes: int,
    time_budget_s: Optional[float] = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    desc: str = "episodes",
) -> list[float]:
    """Run ``step(tasks)`` until ``max_episodes`` or ``time_budget_s``; resume from ``checkpoint``.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict``
    (model, optimiser, scheduler). ``make_tasks(seed_offset)`` builds the task
    sampler; a resumed run draws from ``seed_offset`` = the episode it resumes
    at, so a run interrupted at the same episode resumes identically. A finished
    run's checkpoint is loaded and no step is taken. Returns every episode's loss.

    Example::

        losses = train_episodes(
            step, lambda offset: build_taskset(train, 5, 1, 15, seed=offset),
            {"model": model, "optimizer": optimizer}, work_dir / "checkpoint.pt",
            fingerprint={"config": asdict(config)}, max_episodes=1000)
    """
    checkpoint = Path(checkpoint)
    episode, elapsed, losses, finished = 0, 0.0, [], False
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved["fingerprint"] != fingerprint:
            raise ValueError(
                f"{checkpoint} was written by a different run ({saved['fingerprint']}, "
                f"now {fingerprint}); delete it or use another work_dir"
            )
        for key, obj in state.items():
            obj.load_state_dict(saved["state"][key])
        episode, elapsed, losses, finished = (
            saved["episode"], saved["elapsed_s"], saved["losses"], saved["finished"]
        )

    def save(done: bool) -> None:
        atomic_save(
            {
                "fingerprint": fingerprint,
                "state": {key: obj.state_dict() for key, obj in state.items()},
                "episode": episode,
                "elapsed_s": elapsed,
                "losses": losses,
                "finished": done,
            },
            checkpoint,
        )

    if finished:
        return losses
    tasks = make_tasks(episode)
    bar = tqdm(total=max_episodes, initial=episode, desc=desc, disable=not progress, leave=False)
    # Time already spent before a kill counts, so the budget bounds the whole fit.
    started = time.monotonic() - elapsed
    while episode < max_episodes and (time_budget_s is None or elapsed < time_budget_s):
        losses.append(float(step(tasks)))
        episode += 1
        elapsed = time.monotonic() - started
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if episode % checkpoint_every == 0:
            save(done=False)
    bar.close()
    save(done=True)
    return losses


def fit_episodically(
    name: str,
    context: Any,
    config: Any,
    step: Callable[[Any], float],
    state: dict[str, Any],
    ways: int,
    queries: int,
) -> list[float]:
    """:func:`train_episodes` on ``ways``-way ``context.shots``-shot tasks of the meta-train split.

    ``config`` needs ``max_episodes``, ``time_budget_s`` and ``checkpoint_every``; the run
    lives in ``context.work_dir / "checkpoint.pt"`` and is tied (fingerprinted) to the
    method, its config, the task shape, the seed and the data set's shape.

    Example::

        losses = fit_episodically(self.name, context, self.config, step,
                                  {"model": model, "optimizer": optimizer}, ways=20, queries=15)
    """
    benchmark = context.benchmark

    def make_tasks(offset: int):
        return build_taskset(benchmark.train, ways, context.shots, queries, seed=context.seed + offset)

    fingerprint = {
        "method": name, "config": asdict(config), "ways": ways, "shots": context.shots,
        "seed": context.seed, "data": [benchmark.channels, benchmark.image_size, len(benchmark.train.labels)],
    }
    return train_episodes(
        step, make_tasks, state, Path(context.work_dir) / "checkpoint.pt", fingerprint,
        max_episodes=config.max_episodes, time_budget_s=config.time_budget_s,
        checkpoint_every=config.checkpoint_every, progress=context.progress, desc=name,
    )
