"""Progress bars that suit where the output goes: a live bar on a terminal, plain lines in a log.

Redirected to a file, a tqdm bar rewrites itself many times a second (a 9-minute bench wrote a
586 KB log of redraws). :func:`progress_bar` keeps the live bar on a terminal; elsewhere it
prints one plain line at most every :data:`LOG_INTERVAL_S` seconds, and the last state. Time
only paces the display: no result depends on it.

Example::

    from mtl_plugin.utils.progress import progress_bar
    for step in progress_bar(range(1000), desc="pretrain"):
        ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for logs: a new postfix or description waits for the next paced redraw."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, as plain lines every :data:`LOG_INTERVAL_S` s when not on a terminal.

    Args:
        iterable: what to iterate over (or ``None`` with ``total=`` and manual ``update``).
        **options: tqdm's options (``desc``, ``total``, ``disable``, ``file``, ...).

    Returns:
        The tqdm bar.

    Example::

        bar = progress_bar(total=600, desc="evaluate", disable=not progress)
    """
    stream = options.get("file") or sys.stderr
    if not _is_terminal(stream):
        options["file"] = _Lines(stream)
        options.setdefault("mininterval", LOG_INTERVAL_S)
        # A line is never rewritten in a log, so keep the last state of every bar.
        options["leave"] = True
        return _LogBar(iterable, **options)
    return tqdm(iterable, **options)
