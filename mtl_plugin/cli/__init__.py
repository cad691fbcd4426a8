"""The ``mtl`` command line: a click group; each subcommand maps flags onto a config dataclass.

A user mistake ends as one ``Error: ...`` line, exit code 2 for a bad argument and 1 for bad
data (see :mod:`mtl_plugin.errors`); a traceback means a bug. The subcommands are imported
when one runs, so that ``mtl --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib

import click

from mtl_plugin.cli.base import Group

__all__ = ["main"]

# name -> (module, attribute, one-line help); tests/test_cli_vocabulary.py checks the help
# against each command's own docstring.
COMMANDS = {
    "bench": ("mtl_plugin.cli.bench", "bench", "Every method (or ablation row) on the same seeded test tasks."),
    "data": ("mtl_plugin.cli.data", "data", "Few-shot data sets: generate, preview, check."),
    "evaluate": (
        "mtl_plugin.cli.pipeline",
        "evaluate_command",
        "Mean accuracy ± 95% CI over seeded N-way K-shot tasks.",
    ),
    "meta-train": (
        "mtl_plugin.cli.pipeline",
        "meta_train_command",
        "Meta-learn SS and the few-shot head's initialisation on a pretrained backbone.",
    ),
    "pretrain": (
        "mtl_plugin.cli.pipeline",
        "pretrain_command",
        "Train backbone + linear head on all meta-train classes; keep the best backbone (head dropped).",
    ),
    "ss-report": ("mtl_plugin.cli.ss", "ss_report", "How many parameters SS learns for BACKBONE."),
}


class _LazyGroup(Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


@click.group(cls=_LazyGroup)
@click.version_option(package_name="mtl-plugin")
def main() -> None:
    """Meta-Transfer Learning for few-shot learning (Sun et al., CVPR 2019)."""
