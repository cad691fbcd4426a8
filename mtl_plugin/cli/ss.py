"""``mtl ss-report``: how many parameters SS learns for a backbone.

Example::

    mtl ss-report resnet12 --granularity channel
"""

from __future__ import annotations

import click
import pandas as pd

from mtl_plugin.backbones import build_backbone
from mtl_plugin.cli.base import Command, count
from mtl_plugin.ss import GRANULARITIES, SSAdapter, SSConfig

__all__ = ["ss_report"]


@click.command("ss-report", cls=Command)
@click.argument("backbone", default="resnet18")
@click.option(
    "--granularity",
    type=click.Choice(GRANULARITIES),
    default=SSConfig().granularity,
    show_default=True,
    help="One scale per kernel (the paper's), per output channel, or auto: per kernel on k x k > 1 "
    "convs, per channel on 1x1 convs (SSAdapter's default).",
)
@click.option("--in-channels", type=count(1), default=3, show_default=True, help="Image channels the backbone takes.")
@click.option("--all-layers/--summary", default=False, help="Print every layer, not only the first and last.")
def ss_report(backbone: str, granularity: str, in_channels: int, all_layers: bool) -> None:
    """How many parameters SS learns for BACKBONE (resnet12, conv4, resnet18-small, any torchvision model),
    per layer and as a share of the backbone."""
    adapter = SSAdapter(build_backbone(backbone, in_channels=in_channels), granularity=granularity)
    report = adapter.parameter_report()
    if not all_layers and len(report) > 7:
        report = pd.concat([report.head(3), report.tail(3)])
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        click.echo(report.to_string(index=False))
