"""``mtl bench`` under torchrun: its processes share the cells out, first come, first served.

Rank 0 generates (or checks) the data set and runs the shared pretraining alone; the other
processes wait for each through the job's store (:class:`~mtl_plugin.utils.distributed.WorkQueue`)
and meanwhile take the cells that need no pretraining. Each cell is computed as one process
computes it alone and lands in its cell file, so the table rank 0 then assembles does not depend
on which process took which cell, nor on how many there were.

Example::

    queue = join()
    if queue is not None:
        wait_for_data(queue)        # ranks 1..n-1: until rank 0 has the data set
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from mtl_plugin.bench.methods import method_spec
from mtl_plugin.utils.distributed import WorkQueue

__all__ = ["announce_data", "join", "process_device", "share_cells", "wait_for_data", "wait_for_pretraining"]

# Store events of a bench under torchrun.
_DATA_READY, _PRETRAINED = "data-ready", "pretrained"


def join() -> WorkQueue | None:
    """The bench's queue of the torchrun job this process belongs to; ``None`` without torchrun or with one process."""
    return WorkQueue.join("mtl-bench")


def wait_for_data(queue: WorkQueue) -> None:
    """On every rank but 0: return once rank 0, which generates (or checks) the data alone, has it."""
    if queue.rank != 0:
        queue.wait_for(_DATA_READY)


def announce_data(queue: WorkQueue) -> None:
    """On rank 0: let the other processes load the data set."""
    if queue.rank == 0:
        queue.announce(_DATA_READY)


def wait_for_pretraining(queue: WorkQueue) -> None:
    """Return once rank 0 has finished the shared pretraining (or found that none is needed)."""
    queue.wait_for(_PRETRAINED)


def process_device(device: torch.device) -> torch.device:
    """``device``, with a GPU of its own for this process when it names no GPU index.

    Example::

        process_device(torch.device("cuda"))   # cuda:1 on the node's second process
    """
    if device.type == "cuda" and device.index is None:
        # One GPU per process of the node, as torchrun numbers them.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def share_cells(
    queue: WorkQueue,
    cells: list[tuple[str, int]],
    pretrain: Callable[[], object],
    run: Callable[[str, int], str],
    echo: Callable[[str], None],
) -> None:
    """Compute cells until none is left; rank 0 pretrains first, then joins, and returns once every process is done.

    Args:
        queue: the bench's queue (:func:`join`).
        cells: every ``(method, shots)`` of the table.
        pretrain: runs the shared pretraining, on rank 0, if a row of ``cells`` uses it.
        run: computes one cell (its cell file is the result) and returns the line that reports it.
        echo: where those lines go, each prefixed with this process's rank.
    """
    if queue.rank == 0:
        if any(method_spec(method).uses_pretraining for method, _ in cells):
            pretrain()
        # Announced even without a pretraining: a method that asks for one without declaring
        # ``uses_pretraining`` then fails on the missing best.pt instead of waiting forever.
        queue.announce(_PRETRAINED)
    # The cells without pretraining first: they keep the other processes busy while rank 0 pretrains.
    # Within each, the most shots first: their tasks hold the most images, so the longest cells start
    # early and the last ones to finish are short (the deep suite's per-task fine-tuning at 5-shot
    # took 40 minutes; started last, it kept one process at work while the other waited 15).
    ordered = sorted(cells, key=lambda cell: (method_spec(cell[0]).uses_pretraining, -cell[1]))
    for index in queue.take(len(ordered)):
        method, shots = ordered[index]
        echo(f"[rank {queue.rank}] {run(method, shots)}")
    queue.finish()
