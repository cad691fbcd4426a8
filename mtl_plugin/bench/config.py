"""What a bench runs: :class:`BenchConfig`, its profiles and suites, and the pretraining it shares.

Example::

    from mtl_plugin.bench.config import BenchConfig
    config = BenchConfig.quick(methods=("protonet", "mtl"), shots=(1,))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_plugin.bench.ablation_report import CLAIMS, COMPARISON_CLAIMS
from mtl_plugin.bench.methods import METHODS, method_spec
from mtl_plugin.bench.methods.ablation import ABLATION_SUITE
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.training.pretrain import PretrainConfig

__all__ = [
    "DEEP_PRETRAIN_EPOCHS",
    "PROFILES",
    "SUITES",
    "SUITE_CLAIMS",
    "BenchConfig",
    "bench_config_from",
    "describe",
    "pretrain_config_for",
]

PROFILES = ("quick", "deep", "paper")
# comparison: every row registered when the bench is imported but the ablation-only ones (a row
# registered later runs when named in ``methods``); ablation: what to adapt after pretraining
# (Sun et al. 2019, Table 3, and this package's options); deep: the rows whose claims the paper
# makes for a deep backbone (the pretrained baselines, MTL and HT, and what to adapt).
SUITES = {
    "comparison": tuple(name for name in METHODS if not method_spec(name).ablation_only),
    "ablation": ABLATION_SUITE,
    "deep": ("protonet", "linear-probe", "finetune", "mtl", "mtl-ht", "ft-head", "ft-all", "ss-last"),
}
# The paired claims each suite's closing note checks (those whose two rows ran).
SUITE_CLAIMS = {
    "comparison": COMPARISON_CLAIMS,
    "ablation": CLAIMS,
    "deep": tuple(dict.fromkeys(COMPARISON_CLAIMS + CLAIMS)),
}
# Epochs of 100 steps of the deep profile's shared pretraining (docs/deep.md: where its
# nearest-class-mean on val stops improving).
DEEP_PRETRAIN_EPOCHS = 40


@dataclass
class BenchConfig:
    """What to compare and on what; defaults are the papers' protocol (``paper`` profile).

    ``profile`` picks each method's budget: ``paper`` its published settings (for a GPU),
    ``quick`` the small budgets that run the whole table on 2 CPU cores, ``deep`` those budgets
    on a half-width ResNet-12. ``suite`` picks the rows (``comparison``: the methods;
    ``ablation``: what to adapt after pretraining, with a learned-parameters column; ``deep``:
    the rows of the paper's deep-backbone claims); ``methods``, when given, replaces the suite's rows.

    Example::

        config = BenchConfig(dataset="mini-imagenet", root="~/data", shots=(1, 5))
        ablation = BenchConfig.quick(suite="ablation")
    """

    dataset: str = "kanji"
    root: str | None = None
    ways: int = 5
    shots: tuple = (1, 5)
    queries: int = 15
    suite: str = "comparison"
    methods: tuple | None = None
    profile: str = "paper"
    test_tasks: int = 600
    backbone: str = "resnet12"
    image_size: int | None = None
    seed: int = 0
    # The data set's own draw (kanji generation, class split); the tasks and methods take ``seed``.
    data_seed: int = 0
    out: Path = Path("bench-out")
    device: str = "auto"
    progress: bool = True
    dataset_options: dict = field(default_factory=dict)
    # The shared pretraining run; None: the profile's (see pretrain_config_for).
    pretrain: PretrainConfig | None = None

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; valid: {', '.join(PROFILES)}")
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid: {', '.join(SUITES)}")
        if self.methods is not None:
            self.methods = tuple(self.methods)
        unknown = [m for m in self.rows if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
        if not self.rows:
            raise ValueError("no method to run: name at least one of " + ", ".join(METHODS))
        if any(s < 1 for s in self.shots) or not self.shots:
            raise ValueError(f"shots={self.shots}: give one or more settings >= 1, e.g. (1, 5)")
        if self.test_tasks < 2:
            raise ValueError(f"test_tasks={self.test_tasks}: a confidence interval needs at least 2 tasks")
        self.out = Path(self.out)
        self.shots = tuple(self.shots)

    @property
    def rows(self) -> tuple:
        """The methods to run: ``methods`` if given, else the suite's."""
        return SUITES[self.suite] if self.methods is None else self.methods

    @classmethod
    def quick(cls, **changes) -> BenchConfig:
        """The whole table on the embedded data set on 2 CPU cores (19-24 minutes on a 2-core Intel
        Xeon as ``make bench`` runs it, two single-threaded processes, as fast as the machine runs
        that hour; docs/speed.md).

        Every data set runs at 28 px in this profile (unless ``image_size`` is given): a folder of
        84 px images at its own size needed over an hour on 2 cores.
        """
        base = dict(profile="quick", dataset="kanji", backbone="conv4", test_tasks=300, image_size=28)
        return cls(**{**base, **changes})

    @classmethod
    def deep(cls, **changes) -> BenchConfig:
        """The paper's deep-backbone question on 2 CPU cores: the ``deep`` suite on kanji at 28 px
        with ResNet-12 at half width (``resnet12-half``, 28x Conv4's weights), 300 test tasks.

        The rows take the quick profile's budgets unless their config has a ``deep()`` of its own
        (``FinetuneConfig.deep``); the shared pretraining is :func:`pretrain_config_for`'s. Settings and
        their measurements: docs/deep.md.
        """
        base = dict(
            profile="deep", suite="deep", dataset="kanji", backbone="resnet12-half", test_tasks=300, image_size=28
        )
        return cls(**{**base, **changes})

    def context(
        self,
        benchmark: Any,
        shots: int,
        work_dir: Path,
        device: torch.device,
        pretrained_backbone: Callable[[], nn.Module],
        progress: bool | None = None,
    ) -> BenchContext:
        """The :class:`BenchContext` a row is fitted in: this config's ways, queries, seed, profile and
        backbone at ``shots`` shots, with this config's ``progress`` unless ``progress`` is given.

        Example::

            context = config.context(benchmark, 1, out / "work" / "mtl", torch.device("cpu"), shared)
        """
        return BenchContext(
            benchmark=benchmark,
            ways=self.ways,
            shots=shots,
            queries=self.queries,
            seed=self.seed,
            work_dir=work_dir,
            profile=self.profile,
            device=device,
            pretrained_backbone=pretrained_backbone,
            backbone_name=self.backbone,
            progress=self.progress if progress is None else progress,
        )


def pretrain_config_for(config: BenchConfig) -> PretrainConfig:
    """The pretraining run the bench shares between methods: the paper's, or a CPU-sized one."""
    if config.pretrain is not None:
        return config.pretrain
    if config.profile == "paper":
        return PretrainConfig(backbone=config.backbone, seed=config.seed)
    if config.profile == "deep":
        # No warmup: the recipe study that chose it ran Conv4 (docs/pretraining.md); the deep
        # profile's pretraining was chosen and measured without one (docs/deep.md).
        return PretrainConfig.quick(
            backbone=config.backbone, seed=config.seed, epochs=DEEP_PRETRAIN_EPOCHS, warmup_share=0.0
        )
    # 4,000 steps of 64 images at the paper's lr 0.1, a warmup over the first tenth, then a cosine
    # schedule: 22 passes over kanji's train split, long enough to converge (94 % training accuracy
    # on its 960 classes; 800 steps ended at 5 %). Every pretrained row stands on this run.
    return PretrainConfig.quick(backbone=config.backbone, seed=config.seed)


def bench_config_from(profile: str, **given) -> BenchConfig:
    """The profile's config with the values the user gave (``None`` = not given) on top."""
    base = {"quick": BenchConfig.quick, "deep": BenchConfig.deep}.get(profile, BenchConfig)()
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def describe(config: BenchConfig) -> str:
    """One line saying what the bench will run."""
    fields = asdict(config)
    shown = ("dataset", "ways", "shots", "suite", "profile", "test_tasks", "backbone", "image_size")
    return ", ".join(f"{k}={fields[k]}" for k in shown)
