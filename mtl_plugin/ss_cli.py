"""``mtl ss-report``: how many parameters SS learns for a backbone.

Example::

    mtl ss-report resnet12 --granularity channel
"""
from __future__ import annotations

import click
import pandas as pd

from mtl_plugin.backbones import build_backbone
from mtl_plugin.errors import Command
from mtl_plugin.ss import GRANULARITIES, SSAdapter

__all__ = ["ss_report"]


@click.command("ss-report", cls=Command)
@click.argument("backbone", default="resnet18")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="kernel", show_default=True,
              help="One scale per kernel (the paper's) or per output channel.")
@click.option("--in-channels", type=click.IntRange(min=1), default=3, show_default=True,
              help="Image channels the backbone takes.")
@click.option("--all-layers/--summary", default=False, help="Print every conv, not only the first and last.")
def ss_report(backbone: str, granularity: str, in_channels: int, all_layers: bool) -> None:
    """How many parameters SS learns for BACKBONE (resnet12, conv4, resnet18-small, any torchvision model)."""
    adapter = SSAdapter(build_backbone(backbone, in_channels=in_channels), granularity=granularity)
    report = adapter.parameter_report()
    if not all_layers and len(report) > 7:
        report = pd.concat([report.head(3), report.tail(3)])
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        click.echo(report.to_string(index=False))
