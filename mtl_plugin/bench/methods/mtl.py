"""The paper's rows in ``mtl bench``: MTL, MTL + hard-task meta-batch, and "train from scratch".

* ``mtl``: SS (Φ) and the FC head's initialisation θ meta-learned on the
  pretrained, frozen backbone;
* ``mtl-ht``: the same with the hard-task meta-batch;
* ``scratch``: the same backbone and head meta-trained episodically from random
  initialisation, every weight learned (the ablation's "train from scratch").

Each writes its run (``metrics.csv`` with the validation curve, ``curve.png``,
checkpoints) to ``context.work_dir`` and resumes from it. The ablation's other
rows (:mod:`mtl_plugin.bench.methods.ablation`) are presets of ``mtl``: configs that change
what the outer loop learns (``MTLConfig.adapt`` and ``blocks``, ``ss``, ``meta``).

Example::

    method = MTL(MTLConfig.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl_plugin.backbones import build_backbone
from mtl_plugin.bench.methods.base import BenchContext, FewShotMethod
from mtl_plugin.meta_transfer import MetaTrainConfig, MetaTransferLearner
from mtl_plugin.speedups import Speedups
from mtl_plugin.ss import SSAdapter, SSConfig, last_block
from mtl_plugin.training.meta_training import meta_train

__all__ = ["ADAPT_MODES", "BLOCKS", "FinetunedLayers", "MTL", "MTLConfig", "MTLHardTasks", "Scratch"]

# What the outer loop learns besides θ: Φ of SS on the frozen backbone, or the pretrained weights.
ADAPT_MODES = ("ss", "finetune")
# Which of the backbone's layers it learns them for.
BLOCKS = ("all", "last", "none")


class FinetunedLayers(nn.Module):
    """A pretrained backbone whose chosen modules keep their own weights trainable.

    The FT counterpart of :class:`~mtl_plugin.ss.SSAdapter`: the outer loop
    updates the weights themselves instead of Φ. BatchNorm stays in eval mode (its
    pretraining statistics), as with ``SSAdapter(bn="frozen")``, so that FT and SS
    rows differ by what they learn alone.

    Args:
        backbone: the pretrained backbone; modified in place (``requires_grad``).
        layers: module names as ``backbone.named_modules()`` spells them whose
            parameters learn; ``None``: every parameter; ``()``: none (FT [θ]).

    Raises:
        ValueError: if a name is not a module of ``backbone``.

    Example::

        encoder = FinetunedLayers(backbone, layers=[last_block(backbone)])   # FT [Θ4; θ]
        features = encoder(images)
    """

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...] | None = None):
        super().__init__()
        backbone.requires_grad_(layers is None)
        for name in layers or ():
            try:
                backbone.get_submodule(name).requires_grad_(True)
            except AttributeError:
                modules = ", ".join(n for n, _ in backbone.named_children())
                raise ValueError(
                    f"layers: {type(backbone).__name__} has no module {name!r}; name modules as "
                    f"named_modules() does (top level: {modules})"
                ) from None
        self.backbone = backbone
        self.layers = layers
        self.train(self.training)

    def train(self, mode: bool = True) -> FinetunedLayers:
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


@dataclass
class MTLConfig:
    """Meta-training budget and SS options of the benchmark rows (the paper's settings by default).

    Attributes:
        meta: the meta-training settings (:class:`MetaTrainConfig`); the bench context sets
            ``ways``, ``shots``, ``queries`` and ``seed``.
        ss: the :class:`SSAdapter` options: the paper's ``"kernel"`` granularity on every layer
            (:meth:`SSConfig.paper`, not the adapter's ``"auto"``); ``ss.layers`` picks layers.
        speedups: how the encoder runs (:class:`~mtl_plugin.speedups.Speedups`); results move
            beyond float tolerance only with ``autocast``.
        adapt: what the outer loop learns besides θ (Sun et al. 2019, Section 5.2): ``"ss"``, Φ on
            the frozen backbone (MTL); ``"finetune"``, the pretrained weights themselves
            (:class:`FinetunedLayers`) at ``finetune_encoder_lr``.
        blocks: for which layers: ``"all"``, ``"last"`` (:func:`~mtl_plugin.ss.last_block`, unless
            ``ss.layers`` names modules) or ``"none"`` (θ alone, ``"finetune"`` only). The
            ablation rows are presets of ``adapt`` and ``blocks``.

    Raises:
        ValueError: ``adapt`` or ``blocks`` unknown, or ``blocks="none"`` with ``adapt="ss"``.

    Example::

        ft_last = MTLConfig(adapt="finetune", blocks="last")   # FT [Θ4; θ]
    """

    meta: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    ss: SSConfig = field(default_factory=SSConfig.paper)
    # The scratch row learns every backbone weight from random initialisation,
    # where Φ's 1e-4 would barely move it: MAML's outer lr instead.
    scratch_encoder_lr: float = 1e-3
    # The outer lr of the FT ablation rows, which meta-learn pretrained weights themselves
    # (None: Φ's; the paper gives no other).
    finetune_encoder_lr: float | None = None
    speedups: Speedups = field(default_factory=Speedups)
    adapt: str = "ss"
    blocks: str = "all"

    def __post_init__(self):
        if self.adapt not in ADAPT_MODES:
            raise ValueError(f"adapt={self.adapt!r}: give one of {', '.join(map(repr, ADAPT_MODES))}")
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks={self.blocks!r}: give one of {', '.join(map(repr, BLOCKS))}")
        if self.blocks == "none" and self.adapt == "ss":
            raise ValueError('blocks="none" with adapt="ss" adapts no layer; for θ alone give adapt="finetune"')

    # Read-only views of ``ss``, so that code reading these options from an MTLConfig keeps working.
    @property
    def granularity(self) -> str:
        return self.ss.granularity

    @property
    def bn(self) -> str:
        return self.ss.bn

    @property
    def layers(self) -> tuple[str, ...] | None:
        return self.ss.layers

    @classmethod
    def quick(cls) -> MTLConfig:
        """100 iterations of 4 tasks (mtl: 4 normal; mtl-ht: 2 normal + 2 hard) for ``--profile quick``.

        Departs from the paper (:class:`MetaTrainConfig`) where a minute of CPU per shot setting calls for it:

        * ``iterations=100`` (paper: 10,000) at a constant rate (``lr_step=100``): on the validation
          split longer runs gain nothing significant at 1-shot and lose at 5-shot, so the time goes
          to the shared pretraining; iteration 0 is validated too and kept when nothing beats it;
        * ``encoder_lr=1e-3``, ``head_lr=1e-2`` (paper: 1e-4, 1e-3): the paper's lrs move
          validation accuracy less in 100 iterations;
        * ``test_inner_steps=50`` (paper: 100) and validation on 50 tasks every 50 iterations:
          less adaptation and validation time;
        * ``finetune_encoder_lr=1e-4``: the FT ablation rows learn pretrained weights 10x below
          Φ's rate, at which FT [Θ; θ] does not collapse.

        Measurements: docs/profiles.md#mtl
        """
        return cls(
            meta=MetaTrainConfig(
                iterations=100,
                meta_batch=2,
                hard_meta_batch=2,
                lr_step=100,
                inner_steps=20,
                test_inner_steps=50,
                encoder_lr=1e-3,
                head_lr=1e-2,
                val_every=50,
                val_tasks=50,
                checkpoint_every=50,
            ),
            finetune_encoder_lr=1e-4,
        )


class MTL(FewShotMethod):
    """Meta-transfer learning: SS + head initialisation meta-learned on the pretrained backbone.

    ``adapts`` names, in the paper's notation, what the outer loop learns
    (the ablation table's second column).

    Example::

        method = MTL(MTLConfig.quick())
        method.fit(context)
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "mtl"
    adapts: ClassVar[str] = "SS [Θ; θ]"
    uses_pretraining: ClassVar[bool] = True
    hard_tasks: ClassVar[bool] = False

    def __init__(self, config: MTLConfig | None = None):
        self.config = config or MTLConfig()
        self.learner: MetaTransferLearner | None = None
        self.backbone_label = ""

    def ss_config(self, backbone: nn.Module) -> SSConfig:
        """The :class:`SSAdapter` options of this row for ``backbone``."""
        if self.config.blocks == "last":
            return replace(self.config.ss, layers=self._last_block(backbone))
        return self.config.ss

    def finetuned_layers(self, backbone: nn.Module) -> tuple[str, ...] | None:
        """The modules whose weights a ``finetune`` row's outer loop updates (``None``: all)."""
        return {"all": None, "last": self._last_block(backbone), "none": ()}[self.config.blocks]

    def _last_block(self, backbone: nn.Module) -> tuple[str, ...]:
        return self.config.ss.layers or (last_block(backbone),)

    def encoder(self, context: BenchContext) -> nn.Module:
        """The module whose trainable parameters are meta-learned."""
        backbone = context.pretrained_backbone()
        if self.config.adapt == "finetune":
            return FinetunedLayers(backbone, self.finetuned_layers(backbone))
        return SSAdapter.from_config(backbone, self.ss_config(backbone))

    def meta_config(self, context: BenchContext) -> MetaTrainConfig:
        """The meta-training config for this context's task shape.

        Without hard tasks the meta-batch holds ``meta_batch + hard_meta_batch``
        normal tasks: every row meta-trains on as many tasks per iteration as
        ``mtl-ht``, so that the two rows differ by the choice of the hard tasks alone.
        """
        meta = self.config.meta
        meta_batch = meta.meta_batch if self.hard_tasks else meta.meta_batch + meta.hard_meta_batch
        meta = replace(
            meta,
            ways=context.ways,
            shots=context.shots,
            queries=context.queries,
            seed=context.seed,
            meta_batch=meta_batch,
            hard_tasks=self.hard_tasks,
        )
        lr = self.config.finetune_encoder_lr
        return meta if self.config.adapt != "finetune" or lr is None else replace(meta, encoder_lr=lr)

    def build_learner(self, context: BenchContext) -> MetaTransferLearner:
        """The encoder and θ of this row, before meta-training."""
        return MetaTransferLearner(
            self.encoder(context), context.ways, self.meta_config(context), speedups=self.config.speedups
        )

    def learned_parameters(self, context: BenchContext) -> int:
        """How many parameters the outer loop updates (the encoder's trainable ones and θ).

        Only the architecture matters: ``context.pretrained_backbone`` may hand out
        an untrained backbone of the same shape.

        Example::

            MTL(MTLConfig.quick()).learned_parameters(context)   # Φ of every conv + d
        """
        return sum(p.numel() for p in self.build_learner(context).meta_parameters())

    def fit(self, context: BenchContext) -> None:
        learner = self.build_learner(context).to(context.device)
        model_info = {
            "backbone": context.backbone_name,
            "in_channels": context.benchmark.channels,
            "image_size": context.benchmark.image_size,
            "method": self.name,
        }
        meta_train(
            learner, context.benchmark, context.work_dir, resume=True, progress=context.progress, model_info=model_info
        )
        self.learner = learner
        self.backbone_label = context.backbone_name

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        if self.learner is None:
            raise RuntimeError(f"{type(self).__name__}.predict called before fit(context)")
        return self.learner.predict(support_x, support_y, query_x, ways).to(query_x.device)


class MTLHardTasks(MTL):
    """MTL with the hard-task meta-batch (k normal tasks, then k' tasks of their failure classes).

    Example::

        method = MTLHardTasks(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "mtl-ht"
    adapts: ClassVar[str] = "SS [Θ; θ] + HT (resample)"
    hard_tasks: ClassVar[bool] = True


class Scratch(MTL):
    """The backbone and head meta-trained from random initialisation, every weight learned.

    Example::

        method = Scratch(MTLConfig.quick())
        method.fit(context)
    """

    name: ClassVar[str] = "scratch"
    adapts: ClassVar[str] = "[Θ; θ] from scratch"
    uses_pretraining: ClassVar[bool] = False

    def encoder(self, context: BenchContext) -> nn.Module:
        benchmark = context.benchmark
        # Seeded without touching the caller's global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            return build_backbone(
                context.backbone_name, in_channels=benchmark.channels, image_size=benchmark.image_size
            )

    def meta_config(self, context: BenchContext) -> MetaTrainConfig:
        return replace(super().meta_config(context), encoder_lr=self.config.scratch_encoder_lr)
