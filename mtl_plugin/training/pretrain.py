"""The large-scale phase of MTL: train backbone + linear head on all meta-train classes, drop the head.

SGD with Nesterov momentum and weight decay (or AdamW, with an optional linear
warmup, for networks such as a small vision transformer), a step (or cosine)
schedule, the data set's training augmentation. Every epoch the backbone is validated on
few-shot val tasks with a nearest-centroid classifier on its frozen features and
the best epoch is kept (``best.pt``); ``last.pt`` lets a killed run resume.

A run never overwrites another by accident: an output folder that holds a run is
continued only with ``resume`` and replaced only with ``overwrite``. On resume a
new ``lr`` replaces the saved one (the remedy for a diverged run); any other
setting that would change the experiment is refused unless ``override``. The
weights are checked after every optimiser step: a diverging run stops with
:class:`~mtl_plugin.training.run_log.NonFiniteLossError` and its last checkpoints stay as
they were.

Example::

    from mtl_plugin.training.pretrain import PretrainConfig, pretrain
    backbone = pretrain(get_benchmark("kanji"), PretrainConfig(backbone="conv4", epochs=5), "runs/pre")
    features = backbone(images)                      # (B, backbone.feature_dim)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mtl_plugin.data.benchmark import benchmark_identity
from mtl_plugin.data.leak import class_record
from mtl_plugin.errors import DataError, UsageError
from mtl_plugin.evaluation import EvaluationConfig, EvaluationResult, evaluate, nearest_centroid
from mtl_plugin.heads import CosineClassifier, feature_width
from mtl_plugin.training.pretrain_checkpoint import (
    CHECKPOINT_KIND,
    build_pretrained,
    load_pretrained,
    read_pretrain_checkpoint,
)
from mtl_plugin.training.pretrain_config import HEADS, OPTIMIZERS, SCHEDULES, PretrainConfig
from mtl_plugin.training.run_log import (
    DIVERGENCE_FACTOR,
    NonFiniteLossError,
    RunLog,
    all_finite,
    check_same_run,
    fast_forward,
    hold_run_folder,
    previous_run,
    save_checkpoint,
)
from mtl_plugin.utils import distributed
from mtl_plugin.utils.io import check_known_settings
from mtl_plugin.utils.progress import progress_bar

# The config's names stay importable from here, where they have always been.
__all__ = ["HEADS", "OPTIMIZERS", "SCHEDULES", "PretrainConfig", "not_learning", "pretrain", "run_config"]

# A pretraining is reported as not learning when, past this share of its epochs, its training loss
# is still this share of chance level's ln(classes) or more.
NOT_LEARNING_AFTER = 0.5
NOT_LEARNING_LOSS = 0.8
# The one setting a resumed run may change without --override: a lower lr rescues a diverged run.
_MAY_CHANGE_ON_RESUME = ("lr",)


def _optimizer(parameters, config: PretrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
    )


def _warmup_steps(config: PretrainConfig, steps_per_epoch: int) -> int:
    """The run's warmup steps: ``warmup_share`` of its steps, or ``warmup_steps``.

    Raises:
        UsageError: a count of ``warmup_steps`` that leaves no step of the run to the schedule (a
            share always leaves one: it fits a run of any length).
    """
    total = config.epochs * steps_per_epoch
    if config.warmup_share:
        return min(round(config.warmup_share * total), total - 1)
    if config.warmup_steps >= total:
        raise UsageError(
            f"warmup_steps={config.warmup_steps} must be fewer than the run's {total} steps "
            f"({config.epochs} epochs of {steps_per_epoch})"
        )
    return config.warmup_steps


def _schedule(optimizer, config: PretrainConfig, steps_per_epoch: int):
    warmup = _warmup_steps(config, steps_per_epoch)
    if warmup:
        return _warmup_schedule(optimizer, config, steps_per_epoch, warmup)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step * steps_per_epoch, gamma=config.lr_gamma)


def _warmup_schedule(optimizer, config: PretrainConfig, steps_per_epoch: int, warmup: int):
    """Linear warmup to ``lr`` over ``warmup`` steps (fewer than the run's), then ``config.schedule``
    over the steps left."""
    total = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        return config.lr_gamma ** ((step - warmup) // (config.lr_step * steps_per_epoch))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _previous_run(out_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    return previous_run(out_dir, resume, overwrite, CHECKPOINT_KIND, "mtl pretrain", "pretraining run")


def run_config(out_dir: str | Path, changes: dict, resume: bool = False, overwrite: bool = False) -> PretrainConfig:
    """The config a run in ``out_dir`` trains with: the saved run's when resuming one, else the
    defaults; ``changes`` (the settings the user gave) on top.

    Lets a command line resume with only the flags to change, and checks the output folder
    before any data is loaded.

    Args:
        out_dir: the run's folder.
        changes: ``PretrainConfig`` fields to set.
        resume: continue the run in ``out_dir`` if there is one.
        overwrite: replace the run in ``out_dir``.

    Returns:
        The config to pass to :func:`pretrain` with the same ``resume`` and ``overwrite``.

    Raises:
        UsageError: ``out_dir`` holds a run and neither (or both) of ``resume`` and ``overwrite``
            is given, or a value is out of range.
        DataError: its ``last.pt`` is unreadable.

    Example::

        config = run_config("runs/pre", {"lr": 0.01}, resume=True)
    """
    previous = _previous_run(Path(out_dir), resume, overwrite)
    saved = check_known_settings(PretrainConfig, previous["config"], Path(out_dir) / "last.pt") if previous else {}
    return PretrainConfig(**{**saved, **changes})


def _check_resumable(state: dict, config: PretrainConfig, info: dict, override: bool, path: Path) -> None:
    # A run saved before an option existed trained with its default.
    saved = {**asdict(PretrainConfig()), **state["config"]}
    may_change = _MAY_CHANGE_ON_RESUME
    if config.schedule == saved.get("schedule") == "step":
        # A step schedule does not depend on the total, so more epochs just continue the same run.
        may_change += ("epochs",)
    check_same_run(path, state["model"], info, saved, asdict(config), may_change, override)
    if state["epoch"] >= config.epochs and config.lr != saved["lr"]:
        raise UsageError(
            f"{path}: the run is finished (epoch {state['epoch']} of {config.epochs}), so a new lr changes "
            f"nothing: pass --overwrite to train anew with lr {config.lr}, or another --out"
        )


def _diverged(what: str, epoch: int, step: int, lr: float, log: RunLog, saved_epoch: int) -> NonFiniteLossError:
    if saved_epoch:
        kept = (
            f"{log.last_path} (epoch {saved_epoch}) and {log.best_path} are kept as they were; continue "
            f"with a lower lr, e.g. --resume --lr {lr / 10:.3g}"
        )
    else:
        kept = f"no checkpoint was written yet; start again with a lower lr, e.g. --lr {lr / 10:.3g}"
    return NonFiniteLossError(
        f"pretraining diverged at epoch {epoch}, step {step}: {what} at lr {lr:.3g}. "
        f"The learning rate is likely too high: {kept}"
    )


def not_learning(rows: list[dict], num_classes: int, epochs: int) -> str | None:
    """What to tell the user of a pretraining that is not learning, or ``None`` if it is.

    Past :data:`NOT_LEARNING_AFTER` of its ``epochs``, a last epoch whose mean training loss is
    still :data:`NOT_LEARNING_LOSS` of chance level (ln ``num_classes``) or more. The loss is
    measured against chance rather than the accuracy: with hundreds of classes an accuracy many
    times chance (2.3 % of 814 classes) can still leave the embedding near its random start.

    Args:
        rows: the run's ``metrics.csv`` rows (``epoch``, ``loss``, ``accuracy``), in order.
        num_classes: the train split's classes.
        epochs: the run's budget.

    Example::

        message = not_learning(pd.read_csv("runs/pre/metrics.csv").to_dict("records"), 960, 40)
    """
    if not rows or num_classes < 2 or rows[-1]["epoch"] < NOT_LEARNING_AFTER * epochs:
        return None
    last, chance = rows[-1], math.log(num_classes)
    if not last["loss"] >= NOT_LEARNING_LOSS * chance:
        return None
    return (
        f"pretraining is not learning: after epoch {last['epoch']} of {epochs} its training loss is "
        f"{last['loss']:.2f}, {100 * last['loss'] / chance:.0f} % of chance level (ln {num_classes} classes = "
        f"{chance:.2f}), training accuracy {last['accuracy']:.1f} % (chance {100 / num_classes:.2g} %); "
        f"every row on this backbone inherits an embedding near its random start: try a warm-up over a tenth "
        f"of the steps if it has none (warmup_share=0.1, --warmup-share 0.1), a lower lr, more epochs or a "
        f"wider backbone "
        f"(README: Is the pretraining learning?; docs/pretraining.md)"
    )


def pretrain(
    benchmark: Any,
    config: PretrainConfig | None = None,
    out_dir: str | Path = "runs/pretrain",
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    override: bool = False,
    *,
    backbone: nn.Module | None = None,
) -> nn.Module:
    """Pretrain ``config.backbone`` (or the user's ``backbone``) on ``benchmark.train_augmented``
    and return its best feature extractor.

    Deterministic given ``config.seed`` (the caller's global torch RNG is left as
    it was). With ``resume`` a finished run returns at once and a killed one
    continues from its last epoch, bit for bit as if it had not stopped.

    Under ``torchrun`` call it on every rank: the classifier is wrapped in
    ``DistributedDataParallel`` and each epoch's shuffle is split among the ranks by a
    ``DistributedSampler``, each rank taking ``batch_size / N`` images a step (the effective
    batch stays ``batch_size`` at ``lr``, as stated on rank 0's first line); validation is
    sharded, rank 0 alone writes the files, and the job resumes with the same number of
    processes.

    Args:
        benchmark: a :class:`~mtl_plugin.data.FewShotBenchmark` (or any object with its splits,
            ``channels`` and ``image_size``).
        config: the hyper-parameters; ``None``: the paper's.
        out_dir: the run's folder: ``best.pt``, ``last.pt``, ``metrics.csv``, ``curve.png``.
        device: where to train.
        resume: continue the run in ``out_dir``; its saved lr is replaced by ``config.lr``.
        progress: progress bars and a line per epoch.
        overwrite: train anew in ``out_dir``; the run there is deleted when this one writes its
            first checkpoint (a run that fails before that leaves it as it was).
        override: with ``resume``, continue under the settings of ``config`` where they differ
            from the saved run's (schedule, epochs, weight decay, ...).
        backbone: the user's own feature extractor (``(B, C, H, W) -> (B, width)``), trained in
            place instead of building ``config.backbone`` by name; its width is read or measured
            (:func:`~mtl_plugin.heads.feature_width`). Its checkpoints record the class name: load
            ``best.pt``'s ``"backbone"`` state into the same class to use it again (or register a
            builder with :func:`~mtl_plugin.backbones.register_backbone` to use it by name).

    Returns:
        The backbone of the best epoch (``best.pt``), on ``device``: ``backbone`` itself if given.

    Raises:
        UsageError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given;
            another process holds ``out_dir`` (:func:`~mtl_plugin.training.run_log.hold_run_folder`);
            ``config`` differs from the run resumed without ``override``; ``batch_size`` is not a
            multiple of the processes, or the run was saved by another number of them.
        DataError: ``out_dir``'s run was trained on other data or another backbone; the train
            split has fewer than 2 classes.
        NonFiniteLossError: the loss or a weight diverged (NaN, infinite, or a loss
            :data:`DIVERGENCE_FACTOR` times chance level); the last checkpoints are kept.

    Example::

        backbone = pretrain(bench, PretrainConfig(backbone="conv4", epochs=3), "runs/pre")
        mine = pretrain(bench, PretrainConfig(epochs=3), "runs/mine", backbone=MyFeatureNet())
    """
    config = config or PretrainConfig()
    _check_before_run(benchmark, config)
    # Held from before the folder is read to the end, so that no second run can mix its files in.
    with hold_run_folder(out_dir):
        return _pretrain(
            benchmark, config, Path(out_dir), torch.device(device), resume, progress, overwrite, override, backbone
        )


def _check_before_run(benchmark: Any, config: PretrainConfig) -> None:
    """Refuse, before the run folder is made, data and settings that cannot pretrain."""
    num_classes = len(benchmark.train_augmented.labels)
    if num_classes < 2:
        # One class: the loss is 0 from the first step and the accuracy 100 %, and nothing is learned.
        raise DataError(
            f"the train split has {num_classes} class; pretraining learns to tell the train classes apart, "
            f"which takes at least 2: add classes to the train split"
        )
    ranks = distributed.world_size()
    if config.batch_size % ranks:
        raise UsageError(
            f"--batch-size {config.batch_size}: each batch is divided among the {ranks} processes of "
            f"the job, so give a multiple of {ranks} (or run fewer processes)"
        )


def _pretrain(
    benchmark: Any,
    config: PretrainConfig,
    out_dir: Path,
    device: torch.device,
    resume: bool,
    progress: bool,
    overwrite: bool,
    override: bool,
    users: nn.Module | None,
) -> nn.Module:
    """:func:`pretrain` in its held run folder."""
    previous = _previous_run(out_dir, resume, overwrite)
    # With overwrite the old run stays until this one has a checkpoint to put in its place.
    log = RunLog(out_dir, replaces=overwrite and distributed.is_main())
    distributed.barrier()
    info = _model_record(benchmark, config, users)
    # The classes this backbone learns, by content: later stages check no val or test class is among them.
    classes = class_record(benchmark.train, getattr(benchmark, "name", None))
    if previous is not None:
        _check_resumable(previous, config, info, override, log.last_path)
        distributed.check_same_job(previous.get("world_size", 1), log.last_path)
    # fork_rng: augmentation draws from torch's global generator; seed it for this run only.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # Under torchrun every rank reads the run folder; rank 0 alone writes it (and the progress bars).
        run = _start(
            benchmark, config, device, users, _RunFiles(log, info, classes), progress and distributed.is_main()
        )
        if previous is not None:
            _resume(run, previous, out_dir)
        else:
            run.scheduler = _schedule(run.optimizer, config, run.steps_per_epoch)
        val_config = EvaluationConfig(
            config.val_ways, config.val_shots, config.val_queries, config.val_tasks, config.seed
        )
        for epoch in range(run.saved_epoch + 1, config.epochs + 1):
            losses, correct, seen = _train_epoch(run, benchmark.train_augmented, epoch)
            result = _validate(run, benchmark.val, val_config, epoch, losses, correct, seen)
            _checkpoint(run, epoch, result)
    distributed.barrier()
    return _best_backbone(log.best_path, device, users)


@dataclass
class _RunFiles:
    """Where a pretraining run writes, and the records every checkpoint of it carries."""

    log: RunLog
    # The model record (build_pretrained rebuilds the backbone from it) and the classes it learns.
    info: dict
    classes: dict


@dataclass
class _Run:
    """One pretraining run under way: what it trains, how, and how far it has got."""

    config: PretrainConfig
    files: _RunFiles
    device: torch.device
    progress: bool
    num_classes: int
    backbone: nn.Module
    # The backbone with its linear head; ``model`` is the same, or its DDP wrapper under torchrun.
    classifier: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    # This rank's share of a batch, and the batches of an epoch.
    batch_size: int
    steps_per_epoch: int
    scheduler: Any = None
    # The last epoch checkpointed (0: none yet) and the best validation accuracy so far.
    saved_epoch: int = 0
    best_accuracy: float = -math.inf
    # The not-learning warning is given once a run.
    warned: bool = False


def _model_record(benchmark: Any, config: PretrainConfig, users: nn.Module | None) -> dict:
    """The model record of the run's checkpoints: the backbone (a user's by its class name), the
    images' shape and the data's identity, which a resumed run must share."""
    name = config.backbone if users is None else f"module:{type(users).__name__}"
    return {
        "backbone": name,
        "in_channels": benchmark.channels,
        "image_size": benchmark.image_size,
        "data": benchmark_identity(benchmark),
    }


def _start(
    benchmark: Any,
    config: PretrainConfig,
    device: torch.device,
    users: nn.Module | None,
    files: _RunFiles,
    progress: bool,
) -> _Run:
    """Seed the run and build what it trains: the backbone and a head (linear or cosine) over the train classes
    (wrapped in DDP under torchrun), their optimiser and the epoch's length in batches."""
    num_classes, ranks = len(benchmark.train_augmented.labels), distributed.world_size()
    torch.manual_seed(config.seed)
    backbone = build_pretrained(files.info) if users is None else users
    # A user's module is measured on one (unaugmented: no random draw) training image.
    width = backbone.feature_dim if users is None else feature_width(users, benchmark.train[0][0].unsqueeze(0))
    head = CosineClassifier(width, num_classes) if config.head == "cosine" else nn.Linear(width, num_classes)
    classifier = nn.Sequential(backbone, head).to(device)
    model, batch_size = classifier, config.batch_size // ranks
    if ranks > 1:
        model = _distributed(classifier, config, device, progress)
    # The batches _loader yields: a rank's share, its last partial batch dropped (unless it is the only one).
    steps_per_epoch = max(math.ceil(len(benchmark.train_augmented) / ranks) // batch_size, 1)
    if config.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    optimizer = _optimizer(classifier.parameters(), config)
    return _Run(
        config,
        files,
        device,
        progress,
        num_classes,
        backbone,
        classifier,
        model,
        optimizer,
        batch_size,
        steps_per_epoch,
    )


def _distributed(classifier: nn.Module, config: PretrainConfig, device: torch.device, progress: bool) -> nn.Module:
    """``classifier`` in DDP, each rank's augmentations seeded apart; say how the batch is divided."""
    ranks = distributed.world_size()
    # Same initial weights on every rank (DDP also broadcasts rank 0's); each rank its own augmentations.
    torch.manual_seed(distributed.rank_seed(config.seed))
    model = nn.parallel.DistributedDataParallel(
        classifier, device_ids=[device.index] if device.type == "cuda" else None
    )
    if progress:
        tqdm.write(
            f"pretrain: {ranks} processes x batch {config.batch_size // ranks} = effective batch "
            f"{config.batch_size}, lr {config.lr:g} (the lr of one process with batch {config.batch_size})"
        )
    return model


def _resume(run: _Run, previous: dict, out_dir: Path) -> None:
    """Continue from ``last.pt`` (``previous``, checked by :func:`_check_resumable`): the weights,
    the optimiser under the config's hyper-parameters, the schedule, the generator and the metrics."""
    config, log = run.config, run.files.log
    run.classifier.load_state_dict(previous["classifier"])
    run.optimizer.load_state_dict(previous["optimizer"])
    # The config's hyper-parameters win over the saved ones (a new lr, or any with override);
    # the schedule is rebuilt under them and brought to the step the run had reached.
    momentum = {"momentum": config.momentum, "nesterov": config.nesterov} if config.optimizer == "sgd" else {}
    for group in run.optimizer.param_groups:
        group.update(lr=config.lr, initial_lr=config.lr, weight_decay=config.weight_decay, **momentum)
    run.scheduler = _schedule(run.optimizer, config, run.steps_per_epoch)
    fast_forward(run.scheduler, previous["scheduler"]["last_epoch"])
    ranks = distributed.world_size()
    torch.set_rng_state(previous["torch_rngs"][distributed.rank()] if ranks > 1 else previous["torch_rng"])
    run.saved_epoch, run.best_accuracy, log.rows = (
        previous["epoch"],
        previous["best_accuracy"],
        list(previous["metrics"]),
    )
    if distributed.is_main():
        # A run stopped after its last.pt but before these were rewritten: they would stay
        # behind it, the finished run's for good.
        log.write(curve=("epoch", "val_accuracy"))
    if run.progress:
        tqdm.write(_resumed_line(run, previous, out_dir))


def _resumed_line(run: _Run, previous: dict, out_dir: Path) -> str:
    """What a resumed run tells the user: where it goes on from, under which lr, or that it is finished.

    A finished run is returned as it is: said, or a second script would silently get the first
    one's backbone.
    """
    config, start = run.config, run.saved_epoch
    if start >= config.epochs:
        return (
            f"pretrain: {out_dir} holds a finished run (epoch {start} of {config.epochs}, best "
            f"val {run.best_accuracy:.2f} %): returning its best.pt; to train anew pass "
            f"overwrite=True (mtl pretrain --overwrite) or another folder"
        )
    saved_lr = previous["config"]["lr"]
    changed = f" with lr {config.lr:g} (was {saved_lr:g})" if config.lr != saved_lr else ""
    return f"pretrain: resuming {out_dir} after epoch {start} of {config.epochs}{changed}"


def _train_epoch(run: _Run, train: Any, epoch: int) -> tuple[list[float], int, int]:
    """Train one epoch; return this rank's step losses and its correct and seen images.

    A diverged loss or weight stops the run there, before anything is saved (:func:`_diverged`).
    """
    config, device = run.config, run.device
    diverged_loss = DIVERGENCE_FACTOR * max(math.log(run.num_classes), 1.0)
    run.classifier.train()
    loader = _loader(train, config, epoch, run.batch_size)
    bar = progress_bar(
        loader,
        total=run.steps_per_epoch,
        desc=f"pretrain {epoch}/{config.epochs}",
        disable=not run.progress,
        leave=False,
    )
    losses, correct, seen = [], 0, 0
    for step, (images, labels) in enumerate(bar):
        if step == run.steps_per_epoch:
            break
        images, labels = images.to(device), torch.as_tensor(labels).to(device)
        logits = run.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        value = loss.item()
        diverged = None
        if not math.isfinite(value) or value > diverged_loss:
            diverged = _diverged_in(run, f"the loss is {value:.3g}", epoch, step + 1)
        # Under torchrun every rank stops together: one stopping alone would leave the
        # others waiting in the gradients' all-reduce.
        distributed.raise_if_any(diverged)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if not all_finite(run.classifier.parameters()):
            raise _diverged_in(run, "a weight became NaN or infinite", epoch, step + 1)
        run.scheduler.step()
        losses.append(value)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{value:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    # Batch-norm statistics are not parameters: check everything that is about to be saved.
    if not all_finite(run.classifier.state_dict().values()):
        raise _diverged_in(run, "a batch-norm statistic became NaN or infinite", epoch, run.steps_per_epoch)
    return losses, correct, seen


def _diverged_in(run: _Run, what: str, epoch: int, step: int) -> NonFiniteLossError:
    """:func:`_diverged` for ``run`` at its current lr."""
    return _diverged(what, epoch, step, run.optimizer.param_groups[0]["lr"], run.files.log, run.saved_epoch)


def _validate(
    run: _Run, val: Any, val_config: EvaluationConfig, epoch: int, losses: list[float], correct: int, seen: int
) -> EvaluationResult:
    """Validate the backbone after ``epoch`` (nearest centroid on its frozen features), log the
    epoch's row (the training figures summed over the ranks) and warn once of a run not learning."""
    result = evaluate(nearest_centroid(run.backbone), val, val_config, progress=False)
    log = run.files.log
    loss_sum, steps, correct, seen = distributed.all_sum([sum(losses), len(losses), correct, seen])
    log.append(
        {
            "epoch": epoch,
            "loss": loss_sum / steps,
            "accuracy": 100.0 * correct / seen,
            "lr": run.optimizer.param_groups[0]["lr"],
            "val_accuracy": result.mean,
            "val_ci95": result.ci95,
        }
    )
    if run.progress:
        tqdm.write(f"pretrain epoch {epoch}: loss {log.rows[-1]['loss']:.3f}, val {result}")
    stalled = not_learning(log.rows, run.num_classes, run.config.epochs)
    if stalled and distributed.is_main() and not run.warned:
        # stacklevel: the warning names the caller of pretrain (through _pretrain and this function).
        warnings.warn(stalled, stacklevel=3)
        run.warned = True
    return result


def _checkpoint(run: _Run, epoch: int, result: EvaluationResult) -> None:
    """Keep the epoch: ``best.pt`` if its validation beats the best so far, and always ``last.pt``,
    the metrics and the curve (rank 0 writes them; every rank records its generator)."""
    config, files = run.config, run.files
    improved = result.beats(run.best_accuracy)
    run.best_accuracy = max(run.best_accuracy, result.mean)
    # Each rank's generator of augmentations, so that every rank resumes its own.
    torch_rngs = distributed.all_gather([torch.get_rng_state()])
    run.saved_epoch = epoch
    if not distributed.is_main():
        return
    files.log.drop_replaced_run()
    header = {"kind": CHECKPOINT_KIND, "model": files.info, "classes": files.classes, "config": asdict(config)}
    if improved:
        save_checkpoint(
            {**header, "epoch": epoch, "val_accuracy": result.mean, "backbone": run.backbone.state_dict()},
            files.log.best_path,
        )
    ranks = distributed.world_size()
    save_checkpoint(
        {
            **header,
            "epoch": epoch,
            "world_size": ranks,
            "classifier": run.classifier.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "torch_rng": torch_rngs[0],
            "best_accuracy": run.best_accuracy,
            "metrics": files.log.rows,
            **({"torch_rngs": torch_rngs} if ranks > 1 else {}),
        },
        files.log.last_path,
    )
    files.log.write(curve=("epoch", "val_accuracy"))


def _best_backbone(best_path: Path, device: torch.device, users: nn.Module | None) -> nn.Module:
    """The run's result: the backbone of its best epoch, rebuilt by name or loaded into the user's module."""
    if users is None:
        return load_pretrained(best_path, device)
    users.load_state_dict(read_pretrain_checkpoint(best_path, "best.pt", device)["backbone"])
    return users


def _loader(train: Any, config: PretrainConfig, epoch: int, batch_size: int) -> torch.utils.data.DataLoader:
    """One epoch's batches of this rank: a seeded shuffle, split among the ranks under torchrun."""
    if distributed.world_size() == 1:
        return torch.utils.data.DataLoader(
            train,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(train) > batch_size,
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
        )
    sampler = torch.utils.data.DistributedSampler(train, shuffle=True, seed=config.seed * 100_003)
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        train, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) > batch_size
    )
