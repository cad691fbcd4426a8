"""``mtl bench``: every method (or ablation row) on the same seeded test tasks.

Example::

    mtl bench --profile quick                     # what `make bench` runs
    mtl bench --data mini-imagenet --root ~/data --profile paper --shots 1,5
"""

from __future__ import annotations

import time

import click
import pandas as pd

from mtl_plugin.backbones import check_backbone
from mtl_plugin.bench.runner import PROFILES, SUITES, BenchConfig, bench_config_from, describe, run_bench
from mtl_plugin.checks import check_device, check_not_input, check_output_dir
from mtl_plugin.cli.base import SEED, Command, count
from mtl_plugin.data.benchmark import data_root, image_size_of

__all__ = ["bench"]


def _csv(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r}: give a comma-separated list, e.g. 1,5") from None

    return parse


def _default(name: str) -> str:
    """``[default: paper X; quick Y; deep Z]`` read from the profiles' configs (the same value once)."""

    def show(value) -> str:
        if value is None:
            return "the data set's"
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    values = {profile: show(getattr(config, name)) for profile, config in _PROFILES.items()}
    if len(set(values.values())) == 1:
        return f"[default: {values['paper']}]"
    return "[default: " + "; ".join(f"{profile} {value}" for profile, value in values.items()) + "]"


_PROFILES = {"paper": BenchConfig(), "quick": BenchConfig.quick(), "deep": BenchConfig.deep()}


@click.command("bench", cls=Command)
@click.option(
    "--data",
    "dataset",
    default=None,
    help=f"kanji (embedded), mini-imagenet, tiered-imagenet, fc100, cifarfs, omniglot or folder. {_default('dataset')}",
)
@click.option(
    "--root", default=None, type=click.Path(), help="Folder holding the data set's files (nothing is downloaded)."
)
@click.option("--ways", default=None, type=count(2), help=f"Classes per task. {_default('ways')}")
@click.option("--shots", default=None, callback=_csv(int), help=f"Shot settings, comma-separated. {_default('shots')}")
@click.option("--queries", default=None, type=count(1), help=f"Queries per class. {_default('queries')}")
@click.option(
    "--suite",
    type=click.Choice(list(SUITES)),
    default=None,
    help=f"comparison: the methods; ablation: what to adapt after pretraining (FT/SS rows, HT modes, "
    f"granularity, bn), with learned parameters, a plot and the paper's claims checked; deep: the "
    f"pretrained baselines, MTL, HT and the FT/SS rows, for a deep backbone. "
    f"{_default('suite')}",
)
@click.option("--methods", default=None, callback=_csv(str), help="Comma-separated rows, instead of the suite's.")
@click.option(
    "--profile",
    type=click.Choice(PROFILES),
    default=None,
    help="quick: the whole table on 2 CPU cores, 28 px, Conv4; deep: the deep suite on a half-width "
    "ResNet-12, 28 px, on 2 CPU cores; paper: the papers' budgets and image sizes (for a GPU). "
    "[default: paper with a GPU, else quick]",
)
@click.option("--test-tasks", default=None, type=count(2), help=f"Test tasks per cell. {_default('test_tasks')}")
@click.option("--backbone", default=None, help=f"Backbone of the pretrained methods. {_default('backbone')}")
@click.option(
    "--image-size", default=None, type=int, help=f"Image side in pixels, for every data set. {_default('image_size')}"
)
@click.option("--seed", default=None, type=SEED, help=f"Seed of the test tasks and of every method. {_default('seed')}")
@click.option(
    "--data-seed",
    default=None,
    type=SEED,
    help=f"Seed of the data set's own draws (kanji generation, splits). {_default('data_seed')}",
)
@click.option("--out", default=None, type=click.Path(), help=f"Output folder, reused to resume. {_default('out')}")
@click.option("--device", default=None, help=f"cpu, cuda or auto. {_default('device')}")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench(profile, quiet, **given):
    """Every method (or ablation row) on the same seeded test tasks.

    Prints the table and writes it as CSV, Markdown and LaTeX, with its plots."""
    import torch

    if profile is None:
        profile = "paper" if torch.cuda.is_available() else "quick"
        click.echo(
            f"mtl bench: --profile {profile}, chosen for this machine "
            f"({'a GPU' if profile == 'paper' else 'no GPU'}); pass --profile to choose"
        )
    try:
        config = bench_config_from(profile, progress=False if quiet else None, **given)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    # What needs no data is checked before the data is loaded (or generated); run_bench checks
    # the task shapes on the loaded data before the shared pretraining.
    check_device(config.device, "--device")
    size = image_size_of(config.dataset, config.image_size, "--image-size")
    check_backbone(config.backbone, size, "--image-size")
    check_not_input(config.out, {"--root": data_root(config.dataset, config.root)}, "--out")
    check_output_dir(config.out, "--out")
    click.echo(f"mtl bench: {describe(config)}")
    start = time.perf_counter()
    result = run_bench(config, echo=click.echo)
    if result is None:
        return  # a torchrun process other than rank 0: rank 0 prints the table
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        click.echo("\n" + result.table.to_string(index=False))
    click.echo(
        f"\nwall-clock {time.perf_counter() - start:.0f} s; wrote " + ", ".join(str(p) for p in result.files.values())
    )
