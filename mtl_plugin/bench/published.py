"""Published accuracies for the "published" columns of ``mtl bench``: other people's numbers, not ours.

Every figure is copied with its source from ``shared/reference/published.md``;
``verified=False`` marks those not yet checked against the paper's PDF. The
published protocol (backbone, image size, number of test tasks) usually differs
from a quick run: the tables show these numbers beside ours, never in their place.

Example::

    from mtl_plugin.bench.published import published_accuracy
    entry = published_accuracy("mini-imagenet", "mtl-ht", ways=5, shots=1)
    print(entry.cell)  # "61.20 ± 1.80"
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = ["PublishedResult", "PUBLISHED", "published_accuracy", "published_table"]


@dataclass(frozen=True)
class PublishedResult:
    """One published accuracy (%) for a method on a data set, with where it comes from."""

    dataset: str
    method: str  # the bench's method name this figure stands beside
    ways: int
    shots: int
    accuracy: float
    ci95: float | None
    backbone: str
    source: str
    verified: bool = False

    @property
    def cell(self) -> str:
        return f"{self.accuracy:.2f}" if self.ci95 is None else f"{self.accuracy:.2f} ± {self.ci95:.2f}"


_SUN_SLIDES = "Sun et al. CVPR 2019, authors' slides (seeds/004)"
_SUN_ABLATION = "Sun et al. CVPR 2019, ablation in the authors' slides (seeds/004)"
_MAML = "Finn et al. ICML 2017"
_MAML_TABLES = "MAML as reported in the MetaOptNet / TADAM tables"
_METAOPT = "MetaOptNet (Lee et al. CVPR 2019), Table 2"
_METANET = "Munkhdalai & Yu, ICML 2017"
_DHILLON = "Dhillon et al. ICLR 2020 (transductive fine-tuning)"
_RFS = "Tian et al. ECCV 2020 (RFS-simple)"


def _rows() -> list[PublishedResult]:
    rows = []

    def add(dataset, method, ways, shots, accuracy, ci95, backbone, source):
        rows.append(PublishedResult(dataset, method, ways, shots, accuracy, ci95, backbone, source))

    # Meta-transfer learning and its ablation rows (ResNet-12, 80-84 px).
    for shots, acc, ci in ((1, 61.2, 1.8), (5, 75.5, 0.8)):
        add("mini-imagenet", "mtl-ht", 5, shots, acc, ci, "ResNet-12", _SUN_SLIDES)
    for shots, acc, ci in ((1, 45.8, 1.9), (5, 57.0, 1.0), (10, 63.4, 0.8)):
        add("fc100", "mtl-ht", 5, shots, acc, ci, "ResNet-12", _SUN_SLIDES)
    for dataset, values in (
        ("mini-imagenet", {"scratch": (45.3, 64.6), "finetune": (55.9, 71.4), "mtl": (60.2, 74.3)}),
        ("fc100", {"scratch": (38.4, 52.6, 58.6), "finetune": (41.6, 54.9, 61.6), "mtl": (43.6, 55.4, 62.4)}),
    ):
        for method, accuracies in values.items():
            for shots, acc in zip((1, 5, 10), accuracies):
                add(dataset, method, 5, shots, acc, None, "ResNet-12", _SUN_ABLATION)
                if method == "finetune":
                    # The slides' "finetune on pre-train model" is the ablation's FT [θ] row
                    # (θ meta-learned on the frozen pretrained backbone): `mtl bench --suite ablation`'s ft-head.
                    add(dataset, "ft-head", 5, shots, acc, None, "ResNet-12", _SUN_ABLATION)
    add("tiered-imagenet", "mtl", 5, 1, 65.6, 1.8, "ResNet-12", "MTL official repository README (TensorFlow)")
    add("tiered-imagenet", "mtl", 5, 5, 80.6, 0.9, "ResNet-12", "MTL official repository README (TensorFlow)")

    # MAML (Conv4).
    add("mini-imagenet", "maml", 5, 1, 48.7, 1.8, "Conv4 (32)", _SUN_SLIDES)
    add("mini-imagenet", "maml", 5, 5, 63.1, 0.9, "Conv4 (32)", _SUN_SLIDES)
    add("omniglot", "maml", 5, 1, 98.7, 0.4, "Conv4", _MAML)
    add("omniglot", "maml", 5, 5, 99.9, 0.1, "Conv4", _MAML)
    add("omniglot", "maml", 20, 1, 95.8, 0.3, "Conv4", _MAML)
    add("cifarfs", "maml", 5, 1, 58.9, 1.9, "Conv4", _MAML_TABLES)
    add("cifarfs", "maml", 5, 5, 71.5, 1.0, "Conv4", _MAML_TABLES)
    add("fc100", "maml", 5, 1, 38.1, 1.7, "Conv4", _MAML_TABLES)
    add("fc100", "maml", 5, 5, 50.4, 1.0, "Conv4", _MAML_TABLES)

    # ProtoNets (Conv4, episodic).
    add("mini-imagenet", "protonet-conv4", 5, 1, 49.4, 0.8, "Conv4", _SUN_SLIDES)
    add("mini-imagenet", "protonet-conv4", 5, 5, 68.2, 0.7, "Conv4", _SUN_SLIDES)
    add("cifarfs", "protonet-conv4", 5, 1, 55.5, 0.7, "Conv4", _METAOPT)
    add("cifarfs", "protonet-conv4", 5, 5, 72.0, 0.6, "Conv4", _METAOPT)
    add("fc100", "protonet-conv4", 5, 1, 35.3, 0.6, "Conv4", _METAOPT)
    add("fc100", "protonet-conv4", 5, 5, 48.6, 0.6, "Conv4", _METAOPT)

    # Meta Networks (5-layer convnets, 28 px Omniglot).
    for ways, acc in ((5, 98.95), (10, 98.67), (15, 97.11), (20, 97.00)):
        add("omniglot", "metanet", ways, 1, acc, None, "5-layer conv", _METANET)
    add("mini-imagenet", "metanet", 5, 1, 49.21, 0.96, "5-layer conv", _METANET)

    # Matching Networks, Meta-LSTM (Conv4) and TADAM (ResNet-12), as the MTL paper's table gives them.
    for method, backbone, figures in (
        ("matchingnet", "Conv4", {"mini-imagenet": ((43.4, 0.8), (55.3, 0.7))}),
        ("meta-lstm", "Conv4", {"mini-imagenet": ((43.6, 0.8), (60.6, 0.7))}),
        (
            "tadam",
            "ResNet-12",
            {"mini-imagenet": ((58.5, 0.3), (76.7, 0.3)), "fc100": ((40.1, 0.4), (56.1, 0.4), (61.6, 0.5))},
        ),
    ):
        for dataset, cells in figures.items():
            for shots, (acc, ci) in zip((1, 5, 10), cells):
                add(dataset, method, 5, shots, acc, ci, backbone, _SUN_SLIDES)

    # Fine-tuning a cosine classifier with entropy regularisation (WRN-28-10).
    for dataset, (one, five) in (
        ("mini-imagenet", (65.73, 78.40)),
        ("tiered-imagenet", (73.34, 85.50)),
        ("cifarfs", (76.58, 85.79)),
        ("fc100", (43.16, 57.57)),
    ):
        add(dataset, "cosine-finetune", 5, 1, one, 0.68 if dataset == "mini-imagenet" else None, "WRN-28-10", _DHILLON)
        add(dataset, "cosine-finetune", 5, 5, five, 0.52 if dataset == "mini-imagenet" else None, "WRN-28-10", _DHILLON)

    # Logistic regression on pretrained features (RFS-simple, ResNet-12); tiered-ImageNet without a CI.
    for dataset, cells in (
        ("mini-imagenet", ((62.02, 0.63), (79.64, 0.44))),
        ("tiered-imagenet", ((69.74, None), (84.41, None))),
        ("cifarfs", ((71.5, 0.8), (86.0, 0.5))),
        ("fc100", ((42.6, 0.7), (59.1, 0.6))),
    ):
        for shots, (acc, ci) in zip((1, 5), cells):
            add(dataset, "linear-probe", 5, shots, acc, ci, "ResNet-12", _RFS)
    return rows


PUBLISHED: tuple[PublishedResult, ...] = tuple(_rows())


def published_accuracy(dataset: str, method: str, ways: int, shots: int) -> PublishedResult | None:
    """The published figure for this cell, or ``None`` where nobody published one."""
    for row in PUBLISHED:
        if (row.dataset, row.method, row.ways, row.shots) == (dataset, method, ways, shots):
            return row
    return None


def published_table() -> pd.DataFrame:
    """Every published figure as a DataFrame (one row each, with its source)."""
    return pd.DataFrame([row.__dict__ for row in PUBLISHED])
