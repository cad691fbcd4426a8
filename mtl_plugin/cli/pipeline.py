"""``mtl pretrain``, ``mtl meta-train`` and ``mtl evaluate``: flags mapped onto the config dataclasses.

Example::

    mtl pretrain --data kanji --backbone conv4 --epochs 5 --out runs/pre
    mtl meta-train --data kanji --pretrained runs/pre/best.pt --hard-tasks --out runs/meta
    mtl meta-train --data kanji --pretrained runs/pre/best.pt --hard-tasks --out runs/meta --resume --encoder-lr 1e-5
    mtl evaluate --data kanji --checkpoint runs/meta/best.pt --shots 1 --tasks 600
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import MISSING, fields
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from mtl_plugin.backbones import check_backbone
from mtl_plugin.checks import check_device, check_not_input, check_output_file
from mtl_plugin.cli.base import SEED, Command, count
from mtl_plugin.data.benchmark import benchmark_identity, check_tasks, data_root, image_size_of
from mtl_plugin.data.leak import check_unseen
from mtl_plugin.errors import DataError, NonFiniteLossError, UsageError
from mtl_plugin.evaluation import EvaluationConfig, evaluate
from mtl_plugin.hard_tasks.transform import MODES as HARD_TASK_MODES
from mtl_plugin.meta_config import HEAD_INITS, MetaTrainConfig
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.speedups import AUTOCAST_DTYPES, Speedups
from mtl_plugin.ss import GRANULARITIES, SSAdapter, SSConfig
from mtl_plugin.training.checkpoints import CHECKPOINT_KIND as META_KIND
from mtl_plugin.training.checkpoints import check_learner_checkpoint, encoder_record, learner_from_checkpoint
from mtl_plugin.training.meta_training import meta_train
from mtl_plugin.training.pretrain import HEADS, OPTIMIZERS, SCHEDULES, PretrainConfig, pretrain, run_config
from mtl_plugin.training.pretrain_checkpoint import CHECKPOINT_KIND as PRETRAIN_KIND
from mtl_plugin.training.pretrain_checkpoint import (
    build_pretrained,
    check_backbone_fits,
    check_pretrain_checkpoint,
    pretrained_backbone,
    read_pretrain_checkpoint,
)
from mtl_plugin.training.run_log import hold_run_folder, previous_run
from mtl_plugin.utils import distributed
from mtl_plugin.utils.io import check_known_settings, read_checkpoint, reserved_output

__all__ = ["evaluate_command", "meta_train_command", "pretrain_command"]

# Room for mtl evaluate's JSON (under 1 kB but for the checkpoint's path, itself at most 4 kB).
_RESULT_BYTES = 64 * 1024


def _benchmark(data: str, root: str | None, image_size: int | None, data_seed: int):
    from mtl_plugin.data import get_benchmark

    # get_benchmark checks the size too, in API terms; checked first so that the message names the flag.
    image_size_of(data, image_size, "--image-size")
    return get_benchmark(data, root=root, image_size=image_size, data_seed=data_seed)


def _data_options(command):
    command = click.option("--data", default="kanji", show_default=True, help="Data set name (see mtl data).")(command)
    command = click.option("--root", default=None, help="Folder with the data set's files.")(command)
    command = click.option("--image-size", type=int, default=None, help="Image side (default: the data set's).")(
        command
    )
    command = click.option(
        "--data-seed",
        type=SEED,
        default=0,
        show_default=True,
        help="Seed of the data set's own draws (kanji generation, splits).",
    )(command)
    command = click.option(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        show_default=True,
        help="cpu, cuda or cuda:N (default: cuda if there is a GPU).",
    )(command)
    return command


def _default(config_class, name: str) -> str:
    """``[default: X]`` read from the config dataclass, so that the help never drifts from the code."""
    (field,) = [f for f in fields(config_class) if f.name == name]
    value = field.default if field.default_factory is MISSING else field.default_factory()
    return f"[default: {'none' if value is None else value}]"


def _config_options(config_class, table: list[tuple]):
    """One ``--flag`` per ``(field, type, help)`` of ``table`` (``--flag/--no-flag`` for a bool):
    default ``None`` (the config's, or on ``--resume`` the saved run's), the config's default
    stated in the help."""

    def decorate(command):
        for name, kind, text in reversed(table):
            flag = name.replace("_", "-")
            declaration = f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}"
            command = click.option(
                declaration,
                default=None,
                help=f"{text} {_default(config_class, name)}",
                **({} if kind is bool else {"type": kind}),
            )(command)
        return command

    return decorate


class _FiniteRange(click.FloatRange):
    """A ``FloatRange`` that refuses ``nan`` and ``inf``: a NaN passes every comparison of a range and
    an infinity every lower bound, and both end a run at its first step (blaming the wrong flag)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


_POSITIVE, _COUNT, _RATE = count(1), count(0), _FiniteRange(min=0, min_open=True)
_PRETRAIN_OPTIONS = [
    ("backbone", str, "resnet12, conv4, <torchvision resnet>-small, a torchvision or registered name."),
    ("epochs", _POSITIVE, "Training epochs (the official code's)."),
    ("batch_size", _POSITIVE, "Images per step."),
    ("optimizer", click.Choice(OPTIMIZERS), "sgd (Nesterov momentum) or adamw (e.g. for a vision transformer)."),
    ("lr", _RATE, "Learning rate."),
    ("weight_decay", _FiniteRange(min=0), "Weight decay (L2 for sgd, decoupled for adamw)."),
    (
        "schedule",
        click.Choice(SCHEDULES),
        f"step: lr x{PretrainConfig.lr_gamma} every {PretrainConfig.lr_step} epochs; cosine: to 0.",
    ),
    ("warmup_steps", _COUNT, "Steps of linear warmup to --lr before the schedule, which runs over the rest."),
    (
        "warmup_share",
        _FiniteRange(min=0, max=1, max_open=True),
        "The warmup as a share of the run's steps (e.g. 0.1), in place of --warmup-steps.",
    ),
    ("label_smoothing", _FiniteRange(min=0, max=1, max_open=True), "Label smoothing of the cross-entropy."),
    ("head", click.Choice(HEADS), "The classifier trained and dropped: linear, or cosine (Baseline++)."),
    ("steps_per_epoch", _POSITIVE, "Cap on the steps of an epoch (none: a full pass)."),
    ("val_tasks", _POSITIVE, "Validation tasks per epoch."),
    ("val_ways", count(2), "Classes per validation task."),
    ("val_shots", _POSITIVE, "Shots per validation task."),
    ("val_queries", _POSITIVE, "Queries per class of a validation task."),
    ("seed", SEED, "Seed of the initialisation, batches and validation tasks."),
]
_META_TRAIN_OPTIONS = [
    ("ways", count(2), "Classes per task."),
    ("shots", _POSITIVE, "Support images per class."),
    ("queries", _POSITIVE, "Query images per class."),
    ("inner_steps", _COUNT, "Head adaptation steps while meta-training."),
    ("test_inner_steps", _COUNT, "Head adaptation steps at validation and test time."),
    ("inner_lr", _RATE, "Step size of the head's adaptation."),
    ("encoder_lr", _RATE, "Adam lr of SS (Φ)."),
    ("head_lr", _RATE, "Adam lr of the head init θ."),
    ("first_order", bool, "Drop second-order terms of the meta-gradient."),
    (
        "head_init",
        click.Choice(HEAD_INITS),
        "Where each task's head starts: prototype (its support set's class "
        "means, whatever the label order) or kaiming (the official code's θ).",
    ),
    ("iterations", _POSITIVE, "Outer steps."),
    ("meta_batch", _POSITIVE, "Normal tasks per iteration."),
    ("hard_tasks", bool, "Add the hard-task meta-batch."),
    ("hard_meta_batch", _COUNT, "Hard tasks per iteration."),
    (
        "hard_task_mode",
        click.Choice(HARD_TASK_MODES),
        "resample: new images of the failure classes; reuse: the failed images.",
    ),
    ("val_every", _POSITIVE, "Iterations between validations."),
    ("val_tasks", _POSITIVE, "Tasks per validation."),
    ("checkpoint_every", _POSITIVE, "Iterations between last.pt saves."),
    ("seed", SEED, "Seed of the tasks and the head."),
]
# How the encoder runs (mtl_plugin.speedups): nothing here changes what is learned, but --autocast.
_SPEEDUP_OPTIONS = [
    (
        "support_without_graph",
        bool,
        "First order with the kaiming head and frozen BN: encode the support without a graph.",
    ),
    ("batch_tasks", bool, "A meta-batch's tasks through the backbone in one pass (BN statistics per task)."),
    ("images_per_pass", _POSITIVE, "At most this many images per encoder pass (frozen BN)."),
    ("channels_last", bool, "Images in channels-last memory format."),
    ("compile", bool, "torch.compile the encoder (eager if it cannot)."),
    ("autocast", click.Choice(list(AUTOCAST_DTYPES)), "Run the encoder in this precision (changes results)."),
]


def _overrides(config_class, values: dict) -> dict:
    names = {f.name for f in fields(config_class)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _run_options(command):
    """The run-folder flags that ``pretrain`` and ``meta-train`` share, and ``--quiet``."""
    for option in reversed(
        [
            click.option(
                "--resume",
                is_flag=True,
                help="Continue the run in --out (a finished one is reused); "
                "learning rates given here replace the saved ones.",
            ),
            click.option("--overwrite", is_flag=True, help="Delete the run in --out and train anew."),
            click.option(
                "--override", is_flag=True, help="With --resume: continue under flags that differ from the saved run's."
            ),
            click.option("--quiet", is_flag=True, help="No progress bars."),
        ]
    ):
        command = option(command)
    return command


def _check_override(resume: bool, override: bool) -> None:
    if override and not resume:
        raise UsageError("--override applies to a resumed run: pass it with --resume")


@click.command("pretrain", cls=Command)
@_data_options
@_config_options(PretrainConfig, _PRETRAIN_OPTIONS)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/pretrain",
    show_default=True,
    help="Run folder: best.pt, last.pt, metrics.csv, curve.png.",
)
@_run_options
def pretrain_command(
    data, root, image_size, data_seed, device, out, resume, overwrite, override, quiet, **values
) -> None:
    """Train backbone + linear head on all meta-train classes; keep the best backbone (head dropped)."""
    # Under torchrun: join the job's process group, on this rank's GPU.
    device = distributed.setup(check_device(device, "--device"))
    _check_override(resume, override)
    check_not_input(out, {"--root": data_root(data, root)}, "--out")
    # Held before the folder is read: a second run started at the same moment is refused.
    with hold_run_folder(out, "--out"):
        # With --resume, flags not given keep the saved run's values.
        config = run_config(out, _overrides(PretrainConfig, values), resume=resume, overwrite=overwrite)
        check_backbone(config.backbone, image_size_of(data, image_size, "--image-size"), "--image-size")
        bench = _benchmark(data, root, image_size, data_seed)
        check_tasks(bench, config.val_ways, config.val_shots + config.val_queries, splits=("val",))
        pretrain(
            bench, config, out, device=device, resume=resume, overwrite=overwrite, override=override, progress=not quiet
        )
    if distributed.is_main():
        click.echo(f"best backbone: {Path(out) / 'best.pt'}")


@click.command("meta-train", cls=Command)
@_data_options
@click.option(
    "--pretrained",
    type=click.Path(dir_okay=False),
    default=None,
    help="best.pt of mtl pretrain. Without it: the scratch ablation (random backbone, all weights learned).",
)
@click.option("--backbone", default="resnet12", show_default=True, help="Backbone of the scratch ablation.")
@click.option(
    "--granularity",
    type=click.Choice(GRANULARITIES),
    default=SSConfig.paper().granularity,
    show_default=True,
    help="SS scale per kernel (the paper's), per output channel, or auto: per kernel on k x k > 1 "
    "convs, per channel on 1x1 convs.",
)
@click.option(
    "--output-scaling",
    is_flag=True,
    help="With --granularity channel: scale each conv's output, not its weight (the same function).",
)
@_config_options(MetaTrainConfig, _META_TRAIN_OPTIONS)
@_config_options(Speedups, _SPEEDUP_OPTIONS)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/meta",
    show_default=True,
    help="Run folder: best.pt, last.pt, metrics.csv, curve.png.",
)
@_run_options
def meta_train_command(
    data,
    root,
    image_size,
    data_seed,
    device,
    pretrained,
    backbone,
    granularity,
    output_scaling,
    out,
    resume,
    overwrite,
    override,
    quiet,
    **values,
) -> None:
    """Meta-learn SS and the few-shot head's initialisation on a pretrained backbone."""
    # Under torchrun: join the job's process group, on this rank's GPU.
    device = distributed.setup(check_device(device, "--device"))
    _check_override(resume, override)
    if output_scaling and (granularity != "channel" or not pretrained):
        raise UsageError(
            "--output-scaling needs --granularity channel and --pretrained: it moves SS's one scale per "
            "output channel from the weight to the output"
        )
    if pretrained and click.get_current_context().get_parameter_source("backbone") is not ParameterSource.DEFAULT:
        raise UsageError(
            "--backbone names the scratch ablation's backbone; with --pretrained the backbone is the one "
            "its checkpoint records: drop --backbone"
        )
    check_not_input(out, {"--pretrained": pretrained, "--root": data_root(data, root)}, "--out")
    # Held before the folder is read: a second run started at the same moment is refused.
    with hold_run_folder(out, "--out"):
        # With --resume, flags not given keep the saved run's values.
        previous = previous_run(out, resume, overwrite, META_KIND, "mtl meta-train", "meta-training run")
        saved = check_known_settings(MetaTrainConfig, previous["config"], Path(out) / "last.pt") if previous else {}
        config = MetaTrainConfig(**{**saved, **_overrides(MetaTrainConfig, values)})
        ignored = [name for name in ("hard_meta_batch", "hard_task_mode") if values.get(name) is not None]
        if ignored and not config.hard_tasks:
            flag = "--" + ignored[0].replace("_", "-")
            raise UsageError(f"{flag} sets the hard-task meta-batch, which is off: add --hard-tasks, or drop {flag}")
        speedups = Speedups(**_overrides(Speedups, values))
        if pretrained:
            state = read_pretrain_checkpoint(pretrained, "--pretrained")
            # The backbone only fits images of the size it was trained on: that is the default.
            image_size = state["model"]["image_size"] if image_size is None else image_size
        else:
            check_backbone(backbone, image_size_of(data, image_size, "--image-size"), "--image-size")
        bench = _benchmark(data, root, image_size, data_seed)
        check_tasks(bench, config.ways, config.shots + config.queries, splits=("train", "val"))
        if pretrained:
            check_backbone_fits(state["model"], bench, pretrained, "--pretrained")
            check_unseen(state.get("classes"), bench, f"--pretrained {pretrained}")
            ss = SSConfig(granularity=granularity, output_scaling=output_scaling)
            info = dict(state["model"], **encoder_record(ss))
            model = pretrained_backbone(state, pretrained, "--pretrained", info)
            encoder = SSAdapter.from_config(model, ss)
        else:
            info = {
                "backbone": backbone,
                "in_channels": bench.channels,
                "image_size": bench.image_size,
                "data": benchmark_identity(bench),
                **encoder_record(None),
            }
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                encoder = build_pretrained(info)
        learner = MetaTransferLearner(encoder, config.ways, config, speedups=speedups).to(device)
        result = meta_train(
            learner,
            bench,
            out,
            resume=resume,
            overwrite=overwrite,
            override=override,
            progress=not quiet,
            model_info=info,
            trained_classes=state.get("classes") if pretrained else None,
        )
    if distributed.is_main():
        click.echo(
            f"best val accuracy {result.best_accuracy:.2f} % at iteration {result.best_iteration}: "
            f"{result.best_checkpoint}"
        )


@click.command("evaluate", cls=Command)
@_data_options
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    required=True,
    help="best.pt of mtl meta-train (or of mtl pretrain: a head started at the class means is adapted).",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val"]),
    default="test",
    show_default=True,
    help="The split the tasks come from.",
)
@click.option("--ways", type=count(2), default=EvaluationConfig.ways, show_default=True, help="Classes per task.")
@click.option(
    "--shots",
    type=count(1),
    default=EvaluationConfig.shots,
    show_default=True,
    help="Support images per class.",
)
@click.option(
    "--queries",
    type=count(1),
    default=EvaluationConfig.queries,
    show_default=True,
    help="Query images per class.",
)
@click.option(
    "--tasks",
    type=count(2),
    default=EvaluationConfig.tasks,
    show_default=True,
    help="Test tasks (2 or more: one task has no confidence interval).",
)
@click.option(
    "--seed", type=SEED, default=EvaluationConfig.seed, show_default=True, help="Task seed: same seed, same tasks."
)
@click.option("--inner-steps", type=_COUNT, default=None, help="Adaptation steps (default: the checkpoint's).")
@click.option("--inner-lr", type=_RATE, default=None, help="Step size of the adaptation (default: the checkpoint's).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(
    data,
    root,
    image_size,
    data_seed,
    device,
    checkpoint,
    split,
    ways,
    shots,
    queries,
    tasks,
    seed,
    inner_steps,
    inner_lr,
    out,
    quiet,
) -> None:
    """Mean accuracy ± 95% CI over seeded N-way K-shot tasks."""
    # Under torchrun: join the job's process group, on this rank's GPU.
    device = distributed.setup(check_device(device, "--device"))
    if out:
        check_not_input(out, {"--checkpoint": checkpoint, "--root": data_root(data, root)}, "--out")
        check_output_file(out, "--out")
    # The result's room on disk is taken before the tasks run: a full disk fails now, not at the end.
    reserve = reserved_output(out, _RESULT_BYTES) if out and distributed.is_main() else nullcontext()
    with reserve as write_out:
        # Either kind: read once, then checked as its kind's reader checks it.
        state = read_checkpoint(checkpoint, "--checkpoint")
        if state["kind"] == PRETRAIN_KIND:
            check_pretrain_checkpoint(state, checkpoint, "--checkpoint")
        elif state["kind"] == META_KIND:
            check_learner_checkpoint(state, checkpoint, "--checkpoint")
        else:
            raise DataError(
                f"--checkpoint {checkpoint}: a {state['kind']!r} checkpoint; give the best.pt of "
                f"mtl pretrain or mtl meta-train"
            )
        info = state["model"]
        # The backbone only fits images of the size it was trained on: that is the default.
        bench = _benchmark(data, root, info["image_size"] if image_size is None else image_size, data_seed)
        check_backbone_fits(info, bench, checkpoint, "--checkpoint")
        check_tasks(bench, ways, shots + queries, splits=(split,))
        if split != "train":
            check_unseen(state.get("classes"), bench, f"--checkpoint {checkpoint}")
        if state["kind"] == META_KIND:
            learner = learner_from_checkpoint(state, checkpoint, "--checkpoint").to(device)
        else:
            backbone = pretrained_backbone(state, checkpoint, "--checkpoint", info)
            learner = MetaTransferLearner(backbone.requires_grad_(False), ways, MetaTrainConfig(ways=ways)).to(device)
        if learner.config.head_init == "kaiming" and learner.ways != ways:
            raise click.BadParameter(
                f"{checkpoint} holds a {learner.ways}-way head; pass --ways {learner.ways}", param_hint="--ways"
            )
        if inner_steps is not None:
            learner.config.test_inner_steps = inner_steps
        if inner_lr is not None:
            learner.config.inner_lr = inner_lr
        config = EvaluationConfig(ways, shots, queries, tasks, seed)
        try:
            result = evaluate(learner.predict, getattr(bench, split), config, progress=not quiet)
        except NonFiniteLossError as error:
            remedy = (
                f"pass a lower --inner-lr, e.g. {learner.config.inner_lr / 10:.3g}, or fewer --inner-steps"
                if "inner_lr" in error.settings
                else "check the images for NaN or infinite values"
            )
            raise NonFiniteLossError(
                f"--checkpoint {checkpoint}: the test-time adaptation diverged, so its accuracy "
                f"would be chance, not a result ({error}); {remedy}",
                settings=error.settings,
            ) from error
        if not distributed.is_main():
            return
        click.echo(f"{split} {ways}-way {shots}-shot: {result}")
        if out:
            record = dict(
                result.as_dict(),
                checkpoint=str(checkpoint),
                split=split,
                ways=ways,
                shots=shots,
                queries=queries,
                seed=seed,
            )
            write_out(json.dumps(record, indent=2) + "\n")
