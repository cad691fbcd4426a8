"""The long-run meta-training loop of :class:`~mtl_plugin.meta_transfer.MetaTransferLearner`.

:func:`meta_train` draws the meta-batches (optionally the hard-task meta-batch),
validates, keeps the best and the last checkpoint, writes ``metrics.csv`` and the
curve, and resumes. A run folder is continued only with ``resume`` and replaced
only with ``overwrite``; on resume the learning rates of the config replace the
saved ones, other settings that would change the experiment are refused unless
``override``. A diverging run stops with :class:`~mtl_plugin.errors.NonFiniteLossError`
naming the likely learning rate, and its checkpoints stay as they were.

Example::

    learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTrainConfig(iterations=2000))
    result = meta_train(learner, get_benchmark("kanji"), "runs/meta")
    print(result.best_accuracy, result.best_checkpoint)
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import learn2learn as l2l
import pandas as pd
import torch

from mtl_plugin.data.benchmark import benchmark_identity
from mtl_plugin.data.leak import check_unseen, class_record, merge_records
from mtl_plugin.errors import DataError, UsageError
from mtl_plugin.evaluation import EvaluationConfig, EvaluationResult, evaluate
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.tasks import KShots, RemapLabels, build_taskset, check_task_shape
from mtl_plugin.training.checkpoints import CHECKPOINT_KIND, load_learner_weights, read_meta_checkpoint
from mtl_plugin.training.meta_step import MetaTrainer
from mtl_plugin.training.run_log import (
    NonFiniteLossError,
    RunLog,
    all_finite,
    capture_rng_state,
    check_same_run,
    hold_run_folder,
    previous_run,
    restore_rng_state,
    save_checkpoint,
)
from mtl_plugin.utils import distributed
from mtl_plugin.utils.io import atomic_write_text
from mtl_plugin.utils.plots import plot_meta_curves
from mtl_plugin.utils.progress import progress_bar

# CHECKPOINT_KIND lives beside the checkpoints' reader (training.checkpoints) and stays importable from here.
__all__ = ["CHECKPOINT_KIND", "VALIDATION_FILE", "MetaTrainResult", "meta_train"]

# Per-task validation accuracies (iteration, task, accuracy): every validation uses the same seeded
# tasks, so two iterations (or two runs) compare task by task, as paired differences.
VALIDATION_FILE = "validation.csv"
# What a resumed run may change without override: lower lrs rescue a diverged run, and neither
# the step schedule nor the tasks depend on the total number of iterations.
_MAY_CHANGE_ON_RESUME = ("inner_lr", "encoder_lr", "head_lr", "iterations", "checkpoint_every")
_LEARNING_RATES = ("inner_lr", "encoder_lr", "head_lr")


@dataclass
class MetaTrainResult:
    """Where a meta-training run left its files, and its best validation accuracy.

    Example::

        result = meta_train(learner, benchmark, "runs/meta")
        print(result.best_accuracy, result.best_checkpoint)
    """

    run_dir: Path
    iterations: int
    best_accuracy: float
    best_iteration: int

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.csv"


def _share(config: MetaTrainConfig) -> tuple[int, int]:
    """The normal and hard tasks of a meta-batch that this rank draws: its 1/N share of each."""
    ranks = distributed.world_size()
    for name in ("meta_batch", "hard_meta_batch"):
        value = getattr(config, name)
        if value % ranks and (name == "meta_batch" or config.hard_tasks):
            raise UsageError(
                f"--{name.replace('_', '-')} {value}: the tasks of a meta-batch are divided among the "
                f"{ranks} processes of the job, so give a multiple of {ranks} (or run fewer processes)"
            )
    return config.meta_batch // ranks, config.hard_meta_batch // ranks


class _TaskStream:
    """The meta-batches of a run (this rank's share of them), plain or hard-task, and their generators."""

    def __init__(self, dataset, config: MetaTrainConfig):
        from mtl_plugin.hard_tasks import ClassAccuracyTracker, HardTaskMetaBatch, HardTaskTransform

        self.config = config
        self.normal, hard = _share(config)
        # Rank 0 keeps the run's seed (one process is unchanged); no two ranks draw the same tasks.
        seed = distributed.rank_seed(config.seed)
        self.tasks = build_taskset(dataset, config.ways, config.shots, config.queries, -1, seed)
        rngs = {id(t.rng): t.rng for t in self.tasks.task_transforms if hasattr(t, "rng")}
        self.rngs: list[random.Random] = list(rngs.values())
        self.sampler = None
        if config.hard_tasks:
            meta_dataset = self.tasks.dataset
            self.tracker = ClassAccuracyTracker(
                meta_dataset, seed=random.Random(seed + 1), history_decay=config.hard_history_decay
            )
            hard_rng = random.Random(seed + 2)
            hard_tasks = l2l.data.Taskset(
                meta_dataset,
                task_transforms=[
                    HardTaskTransform(meta_dataset, config.ways, self.tracker, config.hard_task_mode, hard_rng),
                    KShots(meta_dataset, config.shots + config.queries, seed=hard_rng),
                    l2l.data.transforms.LoadData(meta_dataset),
                    RemapLabels(meta_dataset, seed=hard_rng),
                ],
                num_tasks=-1,
            )
            self.sampler = HardTaskMetaBatch(
                self.tasks,
                hard_tasks,
                k=self.normal,
                k_hard=hard,
                seed=random.Random(seed + 3),
            )
            # The tracker's own generator travels in its state_dict.
            self.rngs += [hard_rng, self.sampler.rng]

    def next_batch(self) -> tuple[Iterable, Callable | None]:
        if self.sampler is None:
            # With num_tasks=-1 every read draws a fresh task from the private generators.
            return [self.tasks[0] for _ in range(self.normal)], None
        return self.sampler.sample_meta_batch(), self._record

    def _record(self, task, logits: torch.Tensor, query_y: torch.Tensor) -> None:
        if not task.hard:
            self.tracker.record(task.classes, logits.cpu(), query_y.cpu(), indices=task.indices)

    def state(self) -> dict:
        state = {"rng": capture_rng_state(self.rngs)}
        if self.sampler is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_state(self, state: dict) -> None:
        restore_rng_state(state["rng"], self.rngs)
        if self.sampler is not None:
            self.tracker.load_state_dict(state["tracker"])


def _lower(config: MetaTrainConfig, name: str) -> float:
    # The paper's value when above it, else a tenth.
    value, default = getattr(config, name), next(f.default for f in fields(MetaTrainConfig) if f.name == name)
    return default if value > default else value / 10


def _stopped(
    error: NonFiniteLossError, iteration: int, config: MetaTrainConfig, log: RunLog, saved: int | None
) -> NonFiniteLossError:
    """The message of a diverged run: where, the likely lr and what to run next."""
    lrs = " or ".join(f"{name} {getattr(config, name):.3g}" for name in error.settings)
    flags = " ".join(f"--{name.replace('_', '-')} {_lower(config, name):.3g}" for name in error.settings)
    if error.settings:
        cause = f"Likely cause: {lrs} is too high"
        remedy = f"with a lower lr, e.g. {'--resume ' if saved is not None else ''}{flags}"
    else:
        cause = "Check the data and the pretrained weights for NaN or infinite values"
        remedy = "once they are fixed"
    if saved is not None:
        kept = [str(path) for path in (log.last_path, log.best_path) if path.is_file()]
        kept[0] += f" (iteration {saved})"
        kept = f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept as before; continue {remedy}"
    else:
        kept = f"no checkpoint was written yet; start again {remedy}"
    where = f"{iteration}{' (its validation, before any update)' if iteration == 0 else ''}"
    return NonFiniteLossError(
        f"meta-training diverged at iteration {where}: {error}. {cause}: {kept}", settings=error.settings
    )


def _write_run_files(log: RunLog, validation: list) -> None:
    """``metrics.csv``, ``validation.csv`` and ``curve.png`` of the run as far as ``log`` has it."""
    log.write()
    frame = pd.DataFrame(validation, columns=["iteration", "task", "accuracy"])
    atomic_write_text(log.run_dir / VALIDATION_FILE, frame.to_csv(index=False))
    plot_meta_curves([("", pd.DataFrame(log.rows))], log.curve_path)


def meta_train(
    learner: MetaTransferLearner,
    benchmark: Any,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    model_info: dict | None = None,
    overwrite: bool = False,
    override: bool = False,
    *,
    trained_classes: dict | None = None,
    allow_seen_classes: bool = False,
) -> MetaTrainResult:
    """Meta-train ``learner`` on ``benchmark.train``, validating on ``benchmark.val``.

    Writes ``metrics.csv`` (one row per iteration: loss, accuracy, the accuracy
    of the normal and of the hard tasks (NaN without hard tasks), and validation
    columns every ``val_every``; a fresh run starts with a row for iteration 0,
    validated before any meta-update), ``validation.csv`` (each validation's
    per-task accuracies, the same seeded val tasks every time, for paired
    comparisons), ``curve.png`` (:func:`~mtl_plugin.utils.plots.plot_meta_curves`: the
    validation accuracy and the normal against the hard tasks' training
    accuracy), ``best.pt`` and ``last.pt`` (every ``checkpoint_every`` iterations
    and with every new ``best.pt``) into ``out_dir``. ``model_info`` (e.g. the
    backbone name) is stored in the checkpoints so that ``mtl evaluate`` can
    rebuild the model; the checkpoints also record the training data
    (:func:`~mtl_plugin.data.benchmark.benchmark_identity`). On return the
    learner holds the best validation weights.

    Under ``torchrun`` call it on every rank: each rank draws ``meta_batch / N`` normal
    and ``hard_meta_batch / N`` hard tasks of every meta-batch with its own seed, the
    meta-gradients are averaged over all ranks (see :meth:`~mtl_plugin.training.meta_step.MetaTrainer.step`),
    validation is sharded, and rank 0 alone writes the files; ``last.pt`` holds every rank's
    task generators, so the job resumes with the same number of processes.

    Args:
        learner: the learner; its config is the run's.
        benchmark: a :class:`~mtl_plugin.data.FewShotBenchmark` (or an object with its splits).
        out_dir: the run's folder.
        resume: continue the run in ``out_dir`` from ``last.pt``: a killed run ends in the
            state an uninterrupted one reaches, a finished one returns at once. The config's
            ``encoder_lr``, ``head_lr`` and ``inner_lr`` replace the saved ones.
        progress: a progress bar.
        model_info: what ``mtl evaluate`` needs to rebuild the model.
        overwrite: train anew in ``out_dir``; the run there is deleted when this one writes its
            first checkpoint (a run that fails before that leaves it as it was).
        override: with ``resume``, continue under settings of the config that differ from
            the saved run's (other than the lrs and ``iterations``, which may always change).
        trained_classes: the encoder's earlier training classes (its pretraining checkpoint's ``classes``).
        allow_seen_classes: skip the leak guard, for a deliberate transfer study.

    Returns:
        Where the run is and its best validation accuracy.

    Raises:
        ClassLeakError: a val or test class of ``benchmark`` is in ``trained_classes`` or its train split.
        UsageError: ``meta_batch`` (or ``hard_meta_batch``) is not a multiple of the processes;
            a run resumed by another number of processes; another process holds ``out_dir``
            (:func:`~mtl_plugin.training.run_log.hold_run_folder`);
            ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given;
            the config differs from the run resumed without ``override``; a new lr for a
            finished run.
        DataError: the run in ``out_dir`` was written for other data or another model, or its
            ``last.pt`` is unreadable.
        NonFiniteLossError: the run diverged (see :meth:`~mtl_plugin.training.meta_step.MetaTrainer.step`;
            ``last.pt`` and ``best.pt`` are also checked before every save). The message names
            the iteration, the likely lr and a lower one; the checkpoints are left as they were.

    Example::

        learner = MetaTransferLearner(SSAdapter(backbone), ways=5, config=MetaTrainConfig(iterations=2000))
        result = meta_train(learner, get_benchmark("kanji"), "runs/meta", resume=True)
    """
    config = learner.config
    if not isinstance(config, MetaTrainConfig):
        raise UsageError(
            f"meta_train runs a whole run, but the learner's config is a {type(config).__name__}: build the "
            "learner with a MetaTrainConfig (the method's settings and the run's)"
        )
    if learner.ways != config.ways:
        raise ValueError(f"the learner is {learner.ways}-way but config.ways={config.ways}")
    # Before the folder is made. The train split is checked by build_taskset; check val now rather
    # than at the first validation.
    check_task_shape(benchmark.val, config.ways, config.shots + config.queries)
    # Every class the learner has seen, its pretraining's and this run's: none may be a val or test class.
    classes = merge_records(trained_classes, class_record(benchmark.train, getattr(benchmark, "name", None)))
    check_unseen(classes, benchmark, "the learner", allow_seen_classes)
    # Held from before the folder is read to the end, so that no second run can mix its files in.
    with hold_run_folder(out_dir):
        return _meta_train(learner, benchmark, out_dir, resume, progress, model_info, overwrite, override, classes)


@dataclass
class _MetaRun:
    """One meta-training run under way: what it trains, where it writes, what its checkpoints
    record, and how far it has got."""

    learner: MetaTransferLearner
    # The outer loop: Adam, its schedule and the checked step; last.pt saves the first two.
    trainer: MetaTrainer
    stream: _TaskStream
    log: RunLog
    # The checkpoints' records: the model (model_info), the training data and the learner's training classes.
    model: dict
    data: dict
    classes: dict
    best_accuracy: float = -math.inf
    best_iteration: int = 0
    # Every validation's per-task accuracies, the rows of VALIDATION_FILE.
    validation: list = field(default_factory=list)
    # The last iteration checkpointed (None: nothing saved yet).
    saved: int | None = None


def _resume(run: _MetaRun, state: dict, override: bool) -> int:
    """Load the run saved in ``state`` (its ``last.pt``) after checking that it is the same run;
    return the iteration it had reached."""
    learner, log = run.learner, run.log
    config, path = learner.config, log.last_path
    identity = dict(run.model, train_data=run.data)
    saved_identity = dict(state["model"], **({"train_data": state["data"]} if "data" in state else {}))
    check_same_run(path, saved_identity, identity, state["config"], asdict(config), _MAY_CHANGE_ON_RESUME, override)
    distributed.check_same_job(state.get("world_size", 1), path)
    new_lrs = [name for name in _LEARNING_RATES if state["config"].get(name) != getattr(config, name)]
    if new_lrs and state["iteration"] >= config.iterations:
        raise UsageError(
            f"{path}: the run is finished (iteration {state['iteration']} of {config.iterations}), so "
            f"a new {new_lrs[0]} changes nothing: pass more --iterations to continue it, --overwrite "
            f"to train anew, or another --out"
        )
    load_learner_weights(learner, state, path, "--out")
    try:
        run.stream.load_state(state["streams"][distributed.rank()] if "streams" in state else state["stream"])
    except ValueError as error:
        raise DataError(
            f"--out {log.run_dir}: {error}; pass --overwrite to train anew there, or another --out"
        ) from error
    run.trainer.optimizer.load_state_dict(state["optimizer"])
    # The config's lrs replace the saved ones (the remedy for a diverged run); the schedule is
    # rebuilt under them and brought to the step the run had reached.
    run.trainer.apply_learning_rates(state["scheduler"]["last_epoch"])
    log.rows = list(state["metrics"])
    run.best_accuracy, run.best_iteration = state["best_accuracy"], state["best_iteration"]
    run.validation, run.saved = list(state.get("validation", [])), state["iteration"]
    if distributed.is_main():
        # A run stopped after its last.pt but before these files were rewritten: they would
        # stay behind it, the finished run's for good.
        _write_run_files(log, run.validation)
    return state["iteration"]


def _meta_train(
    learner: MetaTransferLearner,
    benchmark: Any,
    out_dir: str | Path,
    resume: bool,
    progress: bool,
    model_info: dict | None,
    overwrite: bool,
    override: bool,
    classes: dict,
) -> MetaTrainResult:
    """:func:`meta_train` in its held run folder; ``classes`` the learner's training classes."""
    config = learner.config
    previous = previous_run(out_dir, resume, overwrite, CHECKPOINT_KIND, "mtl meta-train", "meta-training run")
    stream = _TaskStream(benchmark.train, config)
    # Under torchrun every rank reads the run folder; rank 0 alone writes it (and the progress bar).
    main = distributed.is_main()
    # With overwrite the old run stays until this one has a checkpoint to put in its place.
    log = RunLog(out_dir, replaces=overwrite and main, other_files=(VALIDATION_FILE,))
    distributed.barrier()
    run = _MetaRun(
        learner,
        MetaTrainer(learner, config),
        stream,
        log,
        dict(model_info or {}),
        benchmark_identity(benchmark),
        classes,
    )
    start = 0 if previous is None else _resume(run, previous, override)
    val_config = EvaluationConfig(config.ways, config.shots, config.queries, config.val_tasks, config.seed)
    bar = progress_bar(
        range(start, config.iterations),
        initial=start,
        total=config.iterations,
        desc="meta-train",
        disable=not (progress and main),
    )
    # A fresh run is validated before its first meta-update too (iteration 0), so that the curve
    # shows what meta-training adds to the pretrained model and the start can be kept as the best.
    for index in itertools.chain([-1] if previous is None else [], bar):
        iteration = index + 1
        row = _training_row(run, iteration)
        result = _validate(run, benchmark.val, val_config, iteration, row)
        improved = result is not None and result.beats(run.best_accuracy)
        log.append(row)
        if improved:
            run.best_accuracy, run.best_iteration = result.mean, iteration
        bar.set_postfix(
            loss=f"{row['loss']:.3f}",
            acc=f"{row['accuracy']:.1f}",
            val=f"{run.best_accuracy:.1f}" if run.best_accuracy > -math.inf else "-",
        )
        # A new best.pt comes with a last.pt, so that a run folder holding best.pt can always resume.
        if improved or iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            _checkpoint(run, iteration, improved)
    distributed.barrier()
    if log.best_path.is_file():
        load_learner_weights(
            learner, read_meta_checkpoint(log.best_path, "--out", learner.device), log.best_path, "--out"
        )
    return MetaTrainResult(Path(out_dir), config.iterations, run.best_accuracy, run.best_iteration)


def _training_row(run: _MetaRun, iteration: int) -> dict:
    """Take iteration ``iteration``'s meta-update and return its row of ``metrics.csv``, validation
    columns empty; iteration 0 (a fresh run's validation before any update) has no training figures."""
    learner, trainer = run.learner, run.trainer
    if iteration:
        tasks, on_task = run.stream.next_batch()
        try:
            step = trainer.step(tasks, on_task)
        except NonFiniteLossError as error:
            raise _stopped(error, iteration, learner.config, run.log, run.saved) from error
        trainer.scheduler.step()
        row = {
            "iteration": iteration,
            "loss": step.loss,
            "accuracy": step.accuracy,
            "normal_accuracy": step.normal_accuracy,
            "hard_accuracy": step.hard_accuracy,
        }
    else:
        row = {
            "iteration": 0,
            "loss": math.nan,
            "accuracy": math.nan,
            "normal_accuracy": math.nan,
            "hard_accuracy": math.nan,
        }
    row.update(encoder_lr=trainer.optimizer.param_groups[0]["lr"], val_accuracy=math.nan, val_ci95=math.nan)
    return row


def _validate(
    run: _MetaRun, val: Any, val_config: EvaluationConfig, iteration: int, row: dict
) -> EvaluationResult | None:
    """Validate the learner if ``iteration`` is one of the validated ones (every ``val_every`` and
    the last): fill the validation columns of ``row``, keep the per-task accuracies and return the
    result; else ``None``."""
    config = run.learner.config
    if not (iteration % config.val_every == 0 or iteration == config.iterations):
        return None
    try:
        result = evaluate(run.learner.predict, val, val_config, progress=False)
    except NonFiniteLossError as error:
        # The validation tasks' adaptation diverged: their accuracy would be chance, not a result.
        raise _stopped(run.trainer.blame(error), iteration, config, run.log, run.saved) from error
    row["val_accuracy"], row["val_ci95"] = result.mean, result.ci95
    run.validation += [
        {"iteration": iteration, "task": task, "accuracy": accuracy} for task, accuracy in enumerate(result.accuracies)
    ]
    return result


def _checkpoint(run: _MetaRun, iteration: int, improved: bool) -> None:
    """Save ``last.pt`` (and ``best.pt`` if ``improved``) and rewrite the run's files, after checking
    that every weight is finite; rank 0 writes, every rank records its task generators."""
    learner, log = run.learner, run.log
    config, trainer = learner.config, run.trainer
    if not all_finite(learner.state_dict().values()):
        error = NonFiniteLossError("a weight or batch-norm statistic is not finite", settings=trainer.suspects(()))
        raise _stopped(error, iteration, config, log, run.saved)
    # Each rank's task generators, so that every rank resumes its own stream.
    streams = distributed.all_gather([run.stream.state()])
    run.saved = iteration
    if not distributed.is_main():
        return
    log.drop_replaced_run()
    header = {
        "kind": CHECKPOINT_KIND,
        "model": run.model,
        "data": run.data,
        "classes": run.classes,
        "config": asdict(config),
        "iteration": iteration,
        "world_size": len(streams),
        "learner": learner.state_dict(),
    }
    if improved:
        save_checkpoint(dict(header, val_accuracy=run.best_accuracy), log.best_path)
    save_checkpoint(
        dict(
            header,
            optimizer=trainer.optimizer.state_dict(),
            scheduler=trainer.scheduler.state_dict(),
            stream=streams[0],
            best_accuracy=run.best_accuracy,
            best_iteration=run.best_iteration,
            metrics=log.rows,
            validation=run.validation,
            **({"streams": streams} if len(streams) > 1 else {}),
        ),
        log.last_path,
    )
    _write_run_files(log, run.validation)
