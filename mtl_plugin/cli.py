"""The ``mtl`` command line: a click group; each subcommand maps flags onto a config dataclass.

A user mistake ends as one ``Error: ...`` line, exit code 2 for a bad argument and 1 for bad
data (see :mod:`mtl_plugin.errors`); a traceback means a bug.
"""
from __future__ import annotations

import time

import click
import pandas as pd

from .backbones import build_backbone, check_backbone
from .data.benchmark import image_size_of
from .data.cli import data
from .errors import Group, check_device, check_output_dir
from .pipeline_cli import evaluate_command, meta_train_command, pretrain_command
from .ss import GRANULARITIES, SSAdapter


@click.group(cls=Group)
@click.version_option(package_name="mtl-plugin")
def main() -> None:
    """Meta-Transfer Learning for few-shot learning (Sun et al., CVPR 2019)."""


for command in (data, pretrain_command, meta_train_command, evaluate_command):
    main.add_command(command)


@main.command("ss-report")
@click.argument("backbone", default="resnet18")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="kernel", show_default=True)
@click.option("--in-channels", default=3, show_default=True)
@click.option("--all-layers/--summary", default=False, help="Print every conv, not only the first and last.")
def ss_report(backbone: str, granularity: str, in_channels: int, all_layers: bool) -> None:
    """How many parameters SS learns for BACKBONE (resnet12, conv4, resnet18-small, any torchvision model)."""
    adapter = SSAdapter(build_backbone(backbone, in_channels=in_channels), granularity=granularity)
    report = adapter.parameter_report()
    if not all_layers and len(report) > 7:
        report = pd.concat([report.head(3), report.tail(3)])
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        click.echo(report.to_string(index=False))


def _csv(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r}: give a comma-separated list, e.g. 1,5")

    return parse


@main.command()
@click.option("--dataset", default=None, help="kanji (embedded default), mini-imagenet, tiered-imagenet, fc100, cifarfs, omniglot or folder.")
@click.option("--root", default=None, type=click.Path(), help="Folder holding the data set's files (nothing is downloaded).")
@click.option("--ways", default=None, type=click.IntRange(min=2), help="Classes per task [5].")
@click.option("--shots", default=None, callback=_csv(int), help="Shot settings, comma-separated [1,5].")
@click.option("--queries", default=None, type=click.IntRange(min=1), help="Queries per class [15].")
@click.option("--suite", type=click.Choice(["comparison", "ablation"]), default=None,
              help="comparison: the methods [default]; ablation: what to adapt after pretraining (FT/SS rows, "
                   "HT modes, granularity, bn), with learned parameters, a plot and the paper's claims checked.")
@click.option("--methods", default=None, callback=_csv(str), help="Comma-separated rows, instead of the suite's.")
@click.option("--profile", type=click.Choice(["quick", "paper"]), default="paper", show_default=True,
              help="quick: the whole table on 2 CPU cores; paper: the papers' budgets (GPU).")
@click.option("--test-tasks", default=None, type=click.IntRange(min=2), help="Test tasks per cell [600; quick 300].")
@click.option("--backbone", default=None, help="Backbone of the pretrained methods [resnet12; quick conv4].")
@click.option("--image-size", default=None, type=int, help="Image side in pixels [the data set's].")
@click.option("--seed", default=None, type=int, help="Seed of the test tasks and of every method [0].")
@click.option("--out", default=None, type=click.Path(), help="Output folder [bench-out]; reused to resume.")
@click.option("--device", default=None, help="cpu, cuda or auto [auto].")
@click.option("--progress/--no-progress", default=None, help="Progress bars [on].")
def bench(profile, **given):
    """Every method (or ablation row) on the same seeded test tasks: prints the table, writes CSV, Markdown, LaTeX and plots."""
    from .bench import bench_config_from, describe, run_bench

    try:
        config = bench_config_from(profile, **given)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    # What needs no data is checked before the data is loaded (or generated); run_bench checks
    # the task shapes on the loaded data before the shared pretraining.
    check_device(config.device)
    check_backbone(config.backbone, image_size_of(config.dataset, config.image_size))
    check_output_dir(config.out)
    click.echo(f"mtl bench: {describe(config)}")
    start = time.perf_counter()
    result = run_bench(config, echo=click.echo)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        click.echo("\n" + result.table.to_string(index=False))
    click.echo(f"\nwall-clock {time.perf_counter() - start:.0f} s; wrote " + ", ".join(str(p) for p in result.files.values()))
