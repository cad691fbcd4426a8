"""How ``mtl`` shows the typed errors of :mod:`mtl_plugin.errors`: the click classes every command uses.

A :class:`~mtl_plugin.errors.UsageError` ends as one ``Error: ...`` line with exit code 2, as
click does for a malformed flag; a :class:`~mtl_plugin.errors.DataError` or
:class:`~mtl_plugin.errors.NonFiniteLossError` as one line with exit code 1; Ctrl-C as one line
with exit code 130. Anything else is a bug and keeps its traceback.

Example::

    @click.command("pretrain", cls=Command)
    @click.option("--seed", type=SEED, default=0)
    def pretrain_command(seed): ...
"""

from __future__ import annotations

from typing import Any

import click

from mtl_plugin.checks import MAX_COUNT, MAX_SEED
from mtl_plugin.errors import DataError, NonFiniteLossError, UsageError

__all__ = ["Command", "Group", "INTERRUPTED_EXIT_CODE", "SEED", "count"]

# The click type of every --seed and --data-seed: one range for every command.
SEED = click.IntRange(min=0, max=MAX_SEED)


def count(least: int) -> click.IntRange:
    """The click type of a count flag: ``least`` or more, and at most :data:`~mtl_plugin.checks.MAX_COUNT`."""
    return click.IntRange(min=least, max=MAX_COUNT)


# The shell's exit status of a process stopped by SIGINT (128 + 2), which scripts test for.
INTERRUPTED_EXIT_CODE = 130


class _Interrupted(click.ClickException):
    exit_code = INTERRUPTED_EXIT_CODE


def _interrupted(ctx: click.Context) -> _Interrupted:
    """The one line for a command stopped by Ctrl-C: what is kept and how to go on."""
    command = " ".join(ctx.command_path.split()[1:]) or ctx.command_path
    params = {param.name for param in ctx.command.params}
    if "resume" in params:
        hint = (
            f"the checkpoints already written in --out are kept; run the same mtl {command} command with "
            f"--resume to continue from the last one"
        )
    elif command == "bench":
        hint = "the finished cells in --out are kept; run the same mtl bench command again to continue"
    else:
        hint = f"no result was written; run mtl {command} again"
    return _Interrupted(f"interrupted (Ctrl-C): {hint}")


class _ShowsUserErrors:
    """Turns the typed errors into click's: one ``Error: ...`` line and exit code 2 or 1 (130 for Ctrl-C)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as error:
            # No ctx: click then prints the one Error line without the usage block.
            raise click.UsageError(str(error)) from error
        except (DataError, NonFiniteLossError) as error:
            raise click.ClickException(str(error)) from error
        except KeyboardInterrupt as error:
            # Not click's bare "Aborted!" with exit 1, the code of bad data.
            raise _interrupted(ctx) from error


class Command(_ShowsUserErrors, click.Command):
    """A click command whose user mistakes end as one ``Error: ...`` line (exit 2 usage, 1 data).

    Example::

        @click.command("pretrain", cls=Command)
        def pretrain_command(...): ...
    """


class Group(_ShowsUserErrors, click.Group):
    """A click group that shows user mistakes like :class:`Command`, in itself and its subcommands.

    Example::

        @click.group(cls=Group)
        def main(): ...
    """

    command_class = Command
