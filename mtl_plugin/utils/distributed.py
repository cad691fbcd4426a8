"""One job in several processes with ``torch.distributed``, as launched by ``torchrun``.

``torchrun --nproc_per_node=N -m mtl_plugin pretrain|meta-train|evaluate ...`` starts N copies
of a command; :func:`setup` joins them into one process group from the variables torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): ``nccl`` on GPUs
(each process on the GPU of its ``LOCAL_RANK``), ``gloo`` on CPU. Without torchrun (or with one
process) nothing changes: every helper here is then the identity, and a single process computes
exactly what it computed before distributed training existed.

The training loops call the collective helpers on every rank at the same points: the meta-
gradients are summed across ranks (:func:`all_reduce_gradients`), the hard-task failures and the
evaluation accuracies are gathered (:func:`all_gather`), a divergence found on one rank stops
every rank (:func:`raise_if_any`). Rank 0 alone writes files and progress bars
(:func:`is_main`); each rank draws its own tasks (:func:`rank_seed`).

Example::

    device = setup(torch.device("cpu"))          # in each command, after parsing --device
    stream_seed = rank_seed(config.seed)          # rank 0 keeps the seed: one process is unchanged
    if is_main():
        save_checkpoint(state, "runs/meta/last.pt")
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mtl_plugin.errors import UsageError

__all__ = [
    "RANK_SEED_STRIDE",
    "WorkQueue",
    "all_gather",
    "all_sum",
    "all_reduce_gradients",
    "barrier",
    "broadcast_buffers",
    "check_same_job",
    "is_main",
    "rank",
    "rank_seed",
    "raise_if_any",
    "setup",
    "world_size",
]

# Far above the few consecutive seeds one run derives from its seed (seed, seed + 1, ...), so that
# no two ranks share a generator.
RANK_SEED_STRIDE = 1_000_003
# A rank that waits longer than this for the others is stuck (a peer hung rather than died):
# stop with an error instead of gloo's and nccl's default of 30 minutes or more.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def world_size() -> int:
    """The number of processes in the job: 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the job: 0 without an initialised process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the job's files and progress bars (rank 0)."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """The seed this rank draws its tasks or augmentations with.

    Rank 0 keeps ``seed``, so a job of one process draws what it always drew; rank r uses
    ``seed + r * RANK_SEED_STRIDE``, so that no two ranks draw the same tasks.

    Example::

        tasks = build_taskset(dataset, 5, 1, 15, -1, seed=rank_seed(config.seed))
    """
    return seed + RANK_SEED_STRIDE * rank()


_KEPT = (
    "The checkpoints already written are kept: run the same command again (pretrain and meta-train with "
    "--resume to continue)."
)
# What gloo and nccl say when the other end of a collective has gone.
_PEER_LOST = ("closed by peer", "remote worker", "Connection reset")


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    # torchrun stops every other process when one fails: say so, once, instead of dying silently.
    sys.stderr.write(
        f"Error: rank {rank()} was stopped by torchrun because another process of the job failed "
        f"(torchrun names it below). {_KEPT}\n"
    )
    sys.stderr.flush()
    os._exit(128 + signum)


def _peer_lost(kind: type, error: BaseException, trace: Any) -> None:
    # A rank waiting in a collective learns first that another one died: one line, not a gloo traceback.
    if isinstance(error, getattr(dist, "DistError", ())) or any(text in str(error) for text in _PEER_LOST):
        # gloo starts its message with the source line: "[.../pair.cc:561] Connection closed by peer ...".
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(error).splitlines()[0]).split(". ")[0]
        sys.stderr.write(
            f"Error: rank {rank()} lost another process of the job, which likely failed (torchrun "
            f"names it below; here: {cause}). {_KEPT}\n"
        )
        return
    sys.__excepthook__(kind, error, trace)


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes in the environment; return this process's device.

    With ``WORLD_SIZE`` unset or 1 it returns ``device`` and does nothing else. Otherwise it
    initialises the default process group (``nccl`` for a CUDA ``device``, each rank on
    ``cuda:LOCAL_RANK``; ``gloo`` on CPU) and destroys it at exit. A rank that torchrun stops
    because another one failed, or that loses another one in a collective, exits with one
    ``Error:`` line saying so and that ``--resume`` continues the run.

    Args:
        device: the device the command was given (``--device``).

    Returns:
        The device this process computes on.

    Raises:
        UsageError: more processes on this node than visible GPUs with a CUDA ``device``.

    Example::

        device = setup(check_device(device))
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun started local rank {local} but only {torch.cuda.device_count()} GPUs are "
                f"visible: pass --nproc_per_node {torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        atexit.register(_teardown)
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
        sys.excepthook = _peer_lost
    return device


def check_same_job(saved_ranks: int, path: Any) -> None:
    """Refuse to resume, with this job's processes, a run that ``saved_ranks`` processes wrote to ``path``.

    Each rank draws its own tasks or augmentations and ``last.pt`` holds every rank's
    generators, so only a job of as many processes continues the run as it would have gone on.

    Raises:
        UsageError: another number of processes; the message gives the torchrun flag to use.

    Example::

        check_same_job(state.get("world_size", 1), "runs/meta/last.pt")
    """
    if saved_ranks != world_size():
        raise UsageError(
            f"{path} was written by a job of {saved_ranks} process(es), this one has {world_size()}: "
            f"resume with torchrun --nproc_per_node {saved_ranks} (over all nodes; without torchrun "
            f"for 1), --overwrite to train anew, or another --out"
        )


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing with one process).

    Example::

        barrier()   # rank 0 has written best.pt; now every rank may read it
    """
    if world_size() > 1:
        dist.barrier()


def all_gather(items: list) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order, on every rank.

    Example::

        failures = all_gather(tracker.failures)   # the same list on every rank
    """
    if world_size() == 1:
        return list(items)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def all_sum(values: list[float]) -> list[float]:
    """Each of ``values`` summed over the ranks (in float64); ``values`` as they are with one process.

    Example::

        loss_sum, steps = all_sum([sum(losses), len(losses)])
    """
    if world_size() == 1:
        return values
    # nccl reduces GPU tensors only.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    summed = torch.tensor([float(value) for value in values], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def raise_if_any(error: BaseException | None) -> None:
    """Raise the error of the lowest rank that had one, on every rank; return if none had.

    A rank that raised alone would leave the others waiting in the next collective.

    Example::

        try:
            step()
        except NonFiniteLossError as caught:
            error = caught
        raise_if_any(error)
    """
    if world_size() > 1:
        errors = [e for e in all_gather([error]) if e is not None]
        error = errors[0] if errors else None
    if error is not None:
        raise error


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], count: int) -> None:
    """Replace each gradient (a sum over this rank's ``count`` items) by the mean over all ranks' items.

    The gradients travel in one flat buffer; a parameter without a gradient counts as zero.
    With one process this divides by ``count``.

    Args:
        parameters: the parameters whose ``.grad`` holds this rank's sum.
        count: the items (tasks) summed on this rank.

    Example::

        for task in my_tasks:
            task_loss(task).backward()
        all_reduce_gradients(learner.meta_parameters(), len(my_tasks))
    """
    parameters = list(parameters)
    if world_size() == 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad /= count
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [parameter.grad for parameter in parameters]
    flat = torch.cat(
        [grad.reshape(-1) for grad in grads]
        + [torch.tensor([float(count)], device=grads[0].device, dtype=grads[0].dtype)]
    )
    dist.all_reduce(flat)
    total = flat[-1]
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad) / total)
        offset += grad.numel()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. batch-norm statistics that train), so that all stay equal.

    Example::

        broadcast_buffers(learner.encoder)
    """
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class WorkQueue:
    """Independent pieces of work shared out among the processes of a torchrun job, first come, first served.

    For a job whose processes each do separate work (``mtl bench``: one table cell at a time)
    rather than train one model together. No process group is formed, so what each process runs
    stays a one-process run (:func:`world_size` is 1 in it, and its numbers are those of a
    single process); the processes share only the key-value store of torchrun's rendezvous.

    Args:
        name: the queue's key prefix in the store.

    Example::

        queue = WorkQueue.join("bench")          # None without torchrun or with one process
        for index in queue.take(len(cells)):
            run(cells[index])
        queue.finish()                           # rank 0 returns once every process is done
    """

    # The waits poll: a blocking store wait would give up after the store's timeout, and
    # the work waited for (a pretraining) may take hours. torchrun stops the job if a process dies.
    POLL_SECONDS = 0.5

    def __init__(self, store: dist.Store, rank: int, size: int, name: str):
        self.store, self.rank, self.size, self.name = store, rank, size, name

    @classmethod
    def join(cls, name: str) -> WorkQueue | None:
        """The queue ``name`` of the torchrun job this process belongs to; ``None`` without torchrun
        or with one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        store, rank, size = next(dist.rendezvous("env://"))
        return cls(store, rank, size, name)

    def _key(self, event: str) -> str:
        return f"{self.name}/{event}"

    def take(self, count: int) -> Iterator[int]:
        """The indices among ``0..count-1`` this process is to do: each index goes to exactly one process."""
        while (index := self.store.add(self._key("next"), 1) - 1) < count:
            yield index

    def announce(self, event: str) -> None:
        """Tell every process that ``event`` has happened."""
        self.store.set(self._key(event), "1")

    def wait_for(self, event: str) -> None:
        """Return once some process has announced ``event``."""
        while not self.store.check([self._key(event)]):
            time.sleep(self.POLL_SECONDS)

    def finish(self) -> None:
        """Say this process is done; on rank 0, return only when every process is."""
        done = self.store.add(self._key("finished"), 1)
        while self.rank == 0 and done < self.size:
            time.sleep(self.POLL_SECONDS)
            done = self.store.add(self._key("finished"), 0)
