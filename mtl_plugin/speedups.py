"""How a meta-train step spends the backbone's forward and backward: :class:`Speedups`.

A meta-train step of MTL is almost all backbone: the inner loop adapts only the
head on cached features. These switches change how the encoder is run, never what
is learned, except ``autocast`` (lower precision, off by default). Each is on by
default only where ``benchmarks/throughput.py`` measured a gain on CPU.

Example::

    from mtl_plugin import MetaTransferLearner, SSAdapter, Speedups
    learner = MetaTransferLearner(SSAdapter(backbone), ways=5,
                                  speedups=Speedups(compile=True, autocast="bf16"))
    features = learner.features(images)      # channels_last, compiled, bf16 matmuls
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl_plugin.errors import UsageError

__all__ = ["AUTOCAST_DTYPES", "EncoderRunner", "Speedups", "per_slice_batch_statistics", "uses_batch_statistics"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Speedups:
    """Switches for the encoder's forward and backward in a meta-train step.

    * ``support_without_graph``: with ``first_order`` and the Kaiming head (the
      official code's θ, which does not depend on the support features) and frozen
      BN, the support set is encoded under ``torch.no_grad()``: first order drops
      the inner loop's path to Φ, so the support features' graph would never be
      used. With the prototype head the support features carry the gradient
      (through the class means), and with BN training they share the query's batch
      statistics, so there the support and query keep their one joint pass.
    * ``batch_tasks``: the tasks of a meta-batch go through the backbone as one
      batch and one backward. A BatchNorm in training normalises each task's slice
      with that task's own statistics (and updates its running statistics task by
      task), as separate passes would. Hard tasks still come after the normal ones
      have been recorded.
    * ``images_per_pass``: the encoder runs on at most this many images at a
      time, each slice with its own graph, when BN is frozen (each image's features
      are then independent of the others'). On CPU smaller passes keep activations
      in cache, forward and backward; None: the whole batch at once.
    * ``channels_last``: images enter the encoder in channels-last memory format,
      which oneDNN (CPU) and cuDNN convolutions run faster.
    * ``compile``: ``torch.compile`` the encoder; where the installed torch or the
      machine cannot compile (no C++ compiler, an unsupported Python), it warns once
      and runs eagerly. Each new input shape or grad mode compiles again.
    * ``autocast``: ``"bf16"`` or ``"fp16"`` runs the encoder under
      ``torch.autocast`` (bf16 on CPUs that support it); the head and inner loop
      stay in float32. It changes results at the precision of the dtype, so it is
      off by default. fp16 runs without loss scaling here, so small gradients of Φ
      may underflow: prefer bf16 where the device has it.

    Raises:
        UsageError: an unknown ``autocast`` dtype or ``images_per_pass`` below 1.

    Example::

        Speedups()                      # the measured defaults
        Speedups.none()                 # the plain eager path (what every switch is compared with)
        dataclasses.replace(Speedups(), compile=True)
    """

    support_without_graph: bool = True
    batch_tasks: bool = False
    images_per_pass: int | None = None
    channels_last: bool = True
    compile: bool = False
    autocast: str | None = None

    def __post_init__(self):
        if self.images_per_pass is not None and self.images_per_pass < 1:
            raise UsageError(f"images_per_pass={self.images_per_pass} must be >= 1, or None for whole batches")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise UsageError(
                f"autocast={self.autocast!r} is unknown; use one of {', '.join(AUTOCAST_DTYPES)} or None (float32)"
            )

    @classmethod
    def none(cls) -> Speedups:
        """Every switch off: one eager float32 pass per task, support and query together."""
        return cls(
            support_without_graph=False,
            batch_tasks=False,
            images_per_pass=None,
            channels_last=False,
            compile=False,
            autocast=None,
        )


def uses_batch_statistics(encoder: nn.Module) -> bool:
    """Whether a BatchNorm of ``encoder`` normalises with its batch's statistics (is training).

    Example::

        uses_batch_statistics(SSAdapter(backbone).train())   # False: SS keeps BN frozen
    """
    return any(isinstance(module, _BatchNorm) and module.training for module in encoder.modules())


def _sliced_batch_norm(module: _BatchNorm, sizes: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    # The class's own forward on each slice: statistics, momentum and num_batches_tracked exactly
    # as in one pass per slice (each layer's running statistics only see its own inputs).
    return torch.cat([type(module).forward(module, part) for part in x.split(list(sizes))])


@contextlib.contextmanager
def per_slice_batch_statistics(encoder: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Within, each BatchNorm of ``encoder`` in training normalises consecutive slices of ``sizes`` samples apart.

    The slices (e.g. the tasks of a meta-batch) then go through the convolutions as one batch
    but get the batch-norm outputs and running statistics of one pass each, in order.

    Args:
        encoder: the module whose training BatchNorms are sliced (others are untouched).
        sizes: the slices' sample counts, summing to the batch size.

    Example::

        with per_slice_batch_statistics(encoder, [len(task_a), len(task_b)]):
            features = encoder(torch.cat([task_a, task_b]))
    """
    modules = [m for m in encoder.modules() if isinstance(m, _BatchNorm) and m.training]
    # An instance attribute shadows the class's forward for this block only.
    own = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = partial(_sliced_batch_norm, module, tuple(sizes))
    try:
        yield
    finally:
        for module, forward in zip(modules, own):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


class EncoderRunner:
    """Calls an encoder as :class:`Speedups` say: memory format, ``torch.compile`` and autocast.

    Not an ``nn.Module``: it holds no weights of its own (the compiled wrapper shares
    the encoder's), so it adds nothing to a learner's ``state_dict``.

    Args:
        encoder: the module to run.
        speedups: which switches apply.

    Example::

        run = EncoderRunner(SSAdapter(backbone), Speedups(channels_last=True))
        features = run(images)
    """

    def __init__(self, encoder: nn.Module, speedups: Speedups):
        self.encoder = encoder
        self.speedups = speedups
        # None: not compiled yet; False: compiling failed, run eagerly from now on.
        self._compiled: nn.Module | None | bool = None

    def __call__(self, x: torch.Tensor, slices: Sequence[int] | None = None) -> torch.Tensor:
        """The encoder's output on ``x``; ``slices``: sample counts of consecutive separate
        tasks, which a BatchNorm in training normalises apart (see :func:`per_slice_batch_statistics`)."""
        if slices is not None and len(slices) > 1 and uses_batch_statistics(self.encoder):
            with per_slice_batch_statistics(self.encoder, slices):
                return self(x)
        if self.speedups.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AUTOCAST_DTYPES.get(self.speedups.autocast)
        precision = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        size = self.speedups.images_per_pass
        with precision:
            if size and len(x) > size and not uses_batch_statistics(self.encoder):
                features = torch.cat([self._forward(part) for part in x.split(size)])
            else:
                features = self._forward(x)
        return features.float() if dtype else features

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.speedups.compile or self._compiled is False:
            return self.encoder(x)
        if self._compiled is not None:
            return self._compiled(x)
        compiled = torch.compile(self.encoder)
        try:
            features = compiled(x)
        except Exception as error:  # noqa: BLE001 - any backend failure means: run eagerly
            warnings.warn(
                f"torch.compile of {type(self.encoder).__name__} failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); running it eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            self._compiled = False
            return self.encoder(x)
        self._compiled = compiled
        return features
