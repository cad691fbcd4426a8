"""Mistakes a user can fix, as typed errors raised where they are found.

Two kinds, both ``ValueError`` so that library code catching ``ValueError`` keeps working:

* :class:`UsageError`: a bad argument (a value, an unknown name, a device that is not there, an
  output folder that cannot be written). ``mtl`` prints one ``Error: ...`` line and exits with
  2, as click does for a malformed flag.
* :class:`DataError`: the input files are missing, empty, damaged or of the wrong kind (a data
  set, a checkpoint). ``mtl`` prints one ``Error: ...`` line and exits with 1.
  :class:`MissingDataError` is also a ``FileNotFoundError``; :class:`OutputError` (an output
  file that could not be written, e.g. on a full disk) is also an ``OSError``.

A training run that diverges raises :class:`NonFiniteLossError` (also importable from
:mod:`mtl_plugin.training.run_log`), shown the same way (exit 1). Anything else is a bug and
keeps its traceback. The checks that raise these before long work starts are in
:mod:`mtl_plugin.checks`, :func:`mtl_plugin.utils.io.read_checkpoint` and
:func:`mtl_plugin.training.run_log.check_run_folder`; how ``mtl`` shows them is
:mod:`mtl_plugin.cli.base`.

Example::

    from mtl_plugin.checks import check_device
    from mtl_plugin.errors import UsageError
    try:
        device = check_device("cuda")
    except UsageError as error:
        print(error)   # device cuda: no CUDA GPU is visible to PyTorch here ...
"""

from __future__ import annotations

__all__ = ["DataError", "MissingDataError", "NonFiniteLossError", "OutputError", "UsageError"]


class UsageError(ValueError):
    """A bad argument; the message names it and says what to pass instead (``mtl`` exit code 2)."""


class DataError(ValueError):
    """Missing, empty, damaged or unsuitable input files (``mtl`` exit code 1)."""


class MissingDataError(DataError, FileNotFoundError):
    """An input file or folder that is not there (also a ``FileNotFoundError``)."""


class OutputError(DataError, OSError):
    """An output file could not be written (a full disk, a quota, a read-only file system); the
    version there before is kept (``mtl`` exit code 1; also an ``OSError``)."""


class NonFiniteLossError(RuntimeError):
    """A training run diverged (a NaN, infinite or exploding loss or weight); its last good checkpoint was kept.

    Args:
        message: what diverged, where.
        settings: the hyper-parameters most likely to blame (config field names such as
            ``"inner_lr"``), most likely first; empty when no setting is to blame (e.g. NaN data).

    Example::

        raise NonFiniteLossError("the query loss is nan", settings=("encoder_lr", "head_lr"))
    """

    def __init__(self, message: str, settings: tuple[str, ...] = ()):
        super().__init__(message)
        self.settings = tuple(settings)
