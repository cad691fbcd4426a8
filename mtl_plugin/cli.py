"""The ``mtl`` command line: a click group; each subcommand maps flags onto a config dataclass."""
from __future__ import annotations

import click
import pandas as pd

from .backbones import build_backbone
from .ss import GRANULARITIES, SSAdapter


@click.group()
@click.version_option(package_name="mtl-plugin")
def main() -> None:
    """Meta-Transfer Learning for few-shot learning (Sun et al., CVPR 2019)."""


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
