"""Episodic training shared by the rows trained from scratch (maml, metanet, meta-lstm, ...).

Bounded by a number of episodes (never by seconds, so that a seed gives the same model on one
machine and thread count, and one within float rounding on another), checkpointed atomically in
the method's work folder, and resumable: a killed bench continues, a finished fit is reused.

Example::

    from mtl_plugin.bench.methods.episodic import train_episodes
    losses = train_episodes(step, lambda episode: build_taskset(train, 5, 1, 15, seed=episode),
                            {"model": model, "optimizer": optimizer}, work_dir / "checkpoint.pt",
                            fingerprint={"config": asdict(config)}, max_episodes=1000)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mtl_plugin.bench.methods.base import FewShotMethod, fit_settings
from mtl_plugin.tasks import build_taskset, split_support_query
from mtl_plugin.utils.io import atomic_save, read_checkpoint
from mtl_plugin.utils.progress import progress_bar

__all__ = [
    "EpisodicMethod",
    "TailAverage",
    "budget_decay",
    "fit_episodically",
    "mean_task_update",
    "sample_episode",
    "tail_average",
    "train_episodes",
]


def train_episodes(
    step: Callable[[Any], float],
    make_tasks: Callable[[int], Any],
    state: dict[str, Any],
    checkpoint: Path,
    fingerprint: dict,
    max_episodes: int,
    checkpoint_every: int = 500,
    progress: bool = True,
    desc: str = "episodes",
) -> list[float]:
    """Run ``step(tasks)`` ``max_episodes`` times in all; resume from ``checkpoint``.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict``
    (model, optimiser, scheduler). ``make_tasks(episode)`` builds the task
    sampler of one episode, so the tasks of an episode depend on its number
    only and a run killed and resumed from its checkpoint is identical to one
    that was never interrupted. A finished run's checkpoint is loaded and no
    step is taken. The checkpoint is read with ``weights_only=True``: it holds
    tensors and plain Python values only, so loading one cannot run code.

    Args:
        step: one training episode on the task sampler; returns its loss.
        make_tasks: ``episode -> task sampler`` (anything ``step`` accepts), seeded
            by the episode number.
        state: the objects to checkpoint, by name.
        checkpoint: the checkpoint file, read if it exists and rewritten every
            ``checkpoint_every`` episodes and at the end.
        fingerprint: plain values (dicts, lists, numbers, strings) naming the
            run; a checkpoint with another fingerprint is refused.
        max_episodes: the budget, in episodes.
        checkpoint_every: episodes between checkpoints.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        Every episode's loss, those of a resumed run's earlier episodes included.

    Raises:
        ValueError: if ``max_episodes`` is negative, ``checkpoint_every`` is not
            positive, or ``checkpoint`` was written by a run with another fingerprint.

    Example::

        losses = train_episodes(
            step, lambda episode: build_taskset(train, 5, 1, 15, seed=episode),
            {"model": model, "optimizer": optimizer}, work_dir / "checkpoint.pt",
            fingerprint={"config": asdict(config)}, max_episodes=1000)
    """
    if max_episodes < 0:
        raise ValueError(f"max_episodes={max_episodes} must be >= 0 (the number of training episodes)")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1 (episodes between checkpoints)")
    checkpoint = Path(checkpoint)
    episode, losses, finished = 0, [], False
    if checkpoint.exists():
        saved = read_checkpoint(checkpoint, require_kind=False)
        if saved["fingerprint"] != fingerprint:
            raise ValueError(
                f"{checkpoint} was written by a different run ({saved['fingerprint']}, "
                f"now {fingerprint}); delete it or use another work_dir"
            )
        for key, obj in state.items():
            obj.load_state_dict(saved["state"][key])
        episode, losses, finished = saved["episode"], saved["losses"], saved["finished"]

    def save(done: bool) -> None:
        atomic_save(
            {
                "fingerprint": fingerprint,
                "state": {key: obj.state_dict() for key, obj in state.items()},
                "episode": episode,
                "losses": losses,
                "finished": done,
            },
            checkpoint,
        )

    if finished:
        return losses
    bar = progress_bar(total=max_episodes, initial=episode, desc=desc, disable=not progress, leave=False)
    while episode < max_episodes:
        losses.append(float(step(make_tasks(episode))))
        episode += 1
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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> list[float]:
    """:func:`train_episodes` on ``ways``-way ``context.shots``-shot tasks of the meta-train split.

    ``config`` (a dataclass of plain values) needs ``max_episodes`` and ``checkpoint_every``;
    the run lives in ``context.work_dir / "checkpoint.pt"`` and is tied (fingerprinted) to
    the method, its config, the task shape, the seed and the data set's shape. Episode
    ``e`` draws its tasks from a sampler seeded by ``(context.seed, e)``.

    Args:
        name: the method's table name, part of the fingerprint.
        context: the bench context (benchmark, shots, seed, work_dir, progress).
        config: the method's config dataclass.
        step: one training episode on a task sampler; returns its loss.
        state: the objects to checkpoint, by name (model, optimiser, ...).
        ways: classes per training task (may exceed the test ways).
        queries: queries per class in a training task.
        scheduler: a learning-rate schedule (:func:`budget_decay`) stepped after every
            episode and checkpointed with ``state``; ``None``: the rate stays.

    If ``config.average_last`` is set, ``state["model"]`` ends as the mean of its weights over
    that last fraction of the episodes (:func:`tail_average`), not as the last iterate.

    Returns:
        Every episode's loss.

    Raises:
        ValueError: as :func:`train_episodes`, or if the meta-train split cannot give
            such tasks.

    Example::

        losses = fit_episodically(self.name, context, self.config, step,
                                  {"model": model, "optimizer": optimizer}, ways=20, queries=15)
    """
    benchmark = context.benchmark

    def make_tasks(episode: int):
        # Distinct for every (seed, episode) pair below 2**32 episodes: no two seeds share tasks.
        return build_taskset(benchmark.train, ways, context.shots, queries, seed=context.seed * 2**32 + episode)

    fingerprint = {
        "method": name,
        "config": fit_settings(config),
        "ways": ways,
        "shots": context.shots,
        "seed": context.seed,
        "data": [benchmark.channels, benchmark.image_size, len(benchmark.train.labels)],
    }
    if scheduler is not None:
        state = {**state, "scheduler": scheduler}
    average = tail_average(state.get("model"), config)
    if average is not None:
        state = {**state, "average": average}

    def scheduled_step(tasks) -> float:
        loss = step(tasks)
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update()
        return loss

    losses = train_episodes(
        scheduled_step,
        make_tasks,
        state,
        Path(context.work_dir) / "checkpoint.pt",
        fingerprint,
        max_episodes=config.max_episodes,
        checkpoint_every=config.checkpoint_every,
        progress=context.progress,
        desc=name,
    )
    if average is not None:
        average.apply()
    return losses


def _last_episodes(config: Any, field: str, what: str) -> int:
    """How many of the budget's last episodes ``config.<field>`` (a fraction; missing: 0) covers, at least 1 if set."""
    fraction = getattr(config, field, 0.0)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{field}={fraction} must lie in [0, 1] (the fraction of the budget {what})")
    return 0 if fraction == 0.0 else max(round(fraction * max(config.max_episodes, 1)), 1)


def budget_decay(optimizer: torch.optim.Optimizer, config: Any) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The learning rate decayed to zero over the last ``config.budget_decay`` of the budget, if set.

    Stepped once per episode, it keeps ``config.lr`` until the last ``budget_decay`` fraction of
    ``config.max_episodes`` and takes it down to 0 on a half cosine over that fraction (1.0:
    cosine annealing over the whole run, Loshchilov & Hutter 2017, without restarts). The model
    kept is the last iterate: under a constant rate it is one full-size step of a noisy
    trajectory, so floats that differ in the last bit (another CPU, another thread count) can
    end it at points whose accuracies differ by more than the confidence interval. It costs
    nothing per episode.

    Args:
        optimizer: the optimiser whose learning rate it sets.
        config: the method's config, with ``max_episodes`` and optionally ``budget_decay``
            (a fraction in (0, 1]; 0 or missing: a constant rate).

    Returns:
        The scheduler (checkpoint it with the model), or ``None`` for a constant rate.

    Raises:
        ValueError: ``budget_decay`` outside [0, 1].

    Example::

        scheduler = budget_decay(optimizer, config)   # scheduler.step() after each optimizer.step()
    """
    decaying = _last_episodes(config, "budget_decay", "that decays")
    if not decaying:
        return None
    start = max(config.max_episodes, 1) - decaying

    def factor(episode: int) -> float:
        return 1.0 if episode < start else 0.5 * (1.0 + math.cos(math.pi * (episode - start) / decaying))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TailAverage:
    """The mean of a model's weights over the episodes from ``start`` on (Polyak averaging).

    Called once per episode, after the optimiser's step, :meth:`update` adds the model's
    floating-point state (parameters and batch-norm running statistics) to a running mean
    from episode ``start`` on; integer buffers keep their last value. :meth:`apply` loads the
    mean into the model. It has ``state_dict``/``load_state_dict``: checkpoint it with the
    model, and a resumed run averages exactly as one never interrupted.

    Args:
        model: the model being trained.
        start: the first episode (counted from 0) whose weights enter the mean.

    Example::

        average = TailAverage(model, start=240)
        for episode in range(300):
            ...; optimizer.step(); average.update()
        average.apply()                     # model now holds the mean of episodes 240-299
    """

    def __init__(self, model: nn.Module, start: int):
        self.model, self.start = model, start
        self.episode, self.count = 0, 0
        self.mean: dict[str, torch.Tensor] = {}

    def update(self) -> None:
        """Count one episode; from ``start`` on, add the model's weights to the mean."""
        self.episode += 1
        if self.episode <= self.start:
            return
        self.count += 1
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                if not value.is_floating_point():
                    continue
                if key in self.mean:
                    self.mean[key] += (value - self.mean[key]) / self.count
                else:
                    self.mean[key] = value.detach().clone()

    def apply(self) -> None:
        """Load the mean into the model (nothing to do before episode ``start``)."""
        if self.count:
            self.model.load_state_dict({**self.model.state_dict(), **self.mean})

    def state_dict(self) -> dict[str, Any]:
        return {"episode": self.episode, "count": self.count, "mean": dict(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episode, self.count = state["episode"], state["count"]
        self.mean = {key: value.clone() for key, value in state["mean"].items()}


def tail_average(model: nn.Module | None, config: Any) -> TailAverage | None:
    """A :class:`TailAverage` of ``model`` over the last ``config.average_last`` of the budget, if set.

    The kept model is otherwise the last iterate: under a constant rate one full-size step of
    a noisy trajectory, whose accuracy floats that differ in the last bit (another CPU,
    another thread count) move by more than the confidence interval. The mean of the last
    iterates sits near the centre of where the trajectory wanders (Polyak & Juditsky 1992;
    stochastic weight averaging, Izmailov et al. 2018), without slowing the learning as a
    decaying rate does.

    Args:
        model: the model being trained (``None``: allowed only when nothing is averaged).
        config: the method's config, with ``max_episodes`` and optionally ``average_last``
            (a fraction in (0, 1]; 0 or missing: keep the last iterate).

    Returns:
        The average (checkpoint it with the model), or ``None`` to keep the last iterate.

    Raises:
        ValueError: ``average_last`` outside [0, 1], or set without a model.

    Example::

        average = tail_average(model, config)    # average.update() after each optimizer.step()
    """
    averaged = _last_episodes(config, "average_last", "averaged")
    if not averaged:
        return None
    if model is None:
        raise ValueError(f"average_last={config.average_last} needs the model to average: pass it as state['model']")
    return TailAverage(model, start=max(config.max_episodes, 1) - averaged)


def sample_episode(tasks: Any, shots: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One task of the sampler ``tasks`` on ``device``, as ``(support_x, support_y, query_x, query_y)``.

    Example::

        support_x, support_y, query_x, query_y = sample_episode(tasks, context.shots, context.device)
    """
    x, y = tasks.sample()
    (support_x, support_y), (query_x, query_y) = split_support_query(x.to(device), y.to(device), shots)
    return support_x, support_y, query_x, query_y


def mean_task_update(
    optimizer: torch.optim.Optimizer,
    task_loss: Callable[[Any], torch.Tensor],
    tasks: Any,
    meta_batch: int = 1,
    clip: float | None = None,
) -> float:
    """One optimiser step on the mean loss of ``meta_batch`` tasks drawn from ``tasks``.

    Each task's loss is backpropagated as soon as it is computed, so the graph of one task at a
    time stays in memory and the accumulated gradient is that of the mean.

    Args:
        optimizer: the optimiser to step (its gradients are zeroed first).
        task_loss: ``tasks -> loss`` of one task it samples from ``tasks``.
        tasks: the episode's task sampler.
        meta_batch: tasks per update.
        clip: if set, the gradient norm of the optimiser's parameters is clipped to it.

    Returns:
        The mean loss of the tasks.

    Raises:
        ValueError: ``meta_batch`` below 1.

    Example::

        def step(tasks) -> float:
            return mean_task_update(optimizer, task_loss, tasks, meta_batch=4)
    """
    if meta_batch < 1:
        raise ValueError(f"meta_batch={meta_batch} must be >= 1 (tasks per update)")
    optimizer.zero_grad()
    mean = 0.0
    for _ in range(meta_batch):
        loss = task_loss(tasks) / meta_batch
        loss.backward()
        mean += loss.item()
    if clip:
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
    optimizer.step()
    return mean


class EpisodicMethod(FewShotMethod):
    """A method trained episodically from scratch whose ``model(support_x, support_y, query_x, ways)``
    gives the query logits; ``fit`` sets ``self.model``, ``self.device`` and ``self.losses``.

    Example::

        class MyMethod(EpisodicMethod):
            name = "mine"
            def fit(self, context):
                self.model, self.device = MyModel().to(context.device), context.device
    """

    uses_pretraining: ClassVar[bool] = False

    def __init__(self):
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.losses: list[float] = []

    def build_model(self, context: Any) -> nn.Module:
        """The untrained model for ``context`` (built under the context's seed)."""
        raise NotImplementedError(f"{type(self).__name__} trains its own way: override fit or build_model")

    def episode_loss(self, output: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """The training loss of one episode from the model's query output."""
        return nn.functional.cross_entropy(output, query_y)

    def fit(self, context: Any) -> None:
        """Train ``build_model(context)`` with Adam at ``config.lr`` on ``config.max_episodes`` updates
        of ``config.meta_batch`` tasks (missing: 1) of ``config.train_queries`` queries (gradient
        norm clipped at ``config.gradient_clip`` if set, the rate decayed to zero by
        :func:`budget_decay` if ``config.budget_decay``)."""
        config = self.config
        self.device = context.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            model = self.build_model(context)
        model.to(context.device).train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        clip = getattr(config, "gradient_clip", None)
        meta_batch = getattr(config, "meta_batch", 1)

        def task_loss(tasks) -> torch.Tensor:
            support_x, support_y, query_x, query_y = sample_episode(tasks, context.shots, context.device)
            return self.episode_loss(model(support_x, support_y, query_x, context.ways), query_y)

        def step(tasks) -> float:
            return mean_task_update(optimizer, task_loss, tasks, meta_batch, clip)

        self.losses = fit_episodically(
            self.name,
            context,
            config,
            step,
            {"model": model, "optimizer": optimizer},
            ways=context.ways,
            queries=config.train_queries,
            scheduler=budget_decay(optimizer, config),
        )
        self.model = model.eval()

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.predict called before fit(context)")
        with torch.no_grad():
            logits = self.model(support_x.to(self.device), support_y.to(self.device), query_x.to(self.device), ways)
        return logits.to(query_x.device)
