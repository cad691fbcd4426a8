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
    """Every published figure, grouped by the paper (or family of methods) it comes from.

    The order is the table's: :func:`published_accuracy` returns the first figure of a cell.
    """
    return [
        *_meta_transfer_rows(),
        *_maml_rows(),
        *_protonet_rows(),
        *_metanet_rows(),
        *_mtl_table_rows(),
        *_cosine_finetune_rows(),
        *_linear_probe_rows(),
    ]


def _meta_transfer_rows() -> list[PublishedResult]:
    """Meta-transfer learning and its ablation rows (ResNet-12, 80-84 px)."""
    rows = []
    for shots, acc, ci in ((1, 61.2, 1.8), (5, 75.5, 0.8)):
        rows.append(PublishedResult("mini-imagenet", "mtl-ht", 5, shots, acc, ci, "ResNet-12", _SUN_SLIDES))
    for shots, acc, ci in ((1, 45.8, 1.9), (5, 57.0, 1.0), (10, 63.4, 0.8)):
        rows.append(PublishedResult("fc100", "mtl-ht", 5, shots, acc, ci, "ResNet-12", _SUN_SLIDES))
    for dataset, values in (
        ("mini-imagenet", {"scratch": (45.3, 64.6), "finetune": (55.9, 71.4), "mtl": (60.2, 74.3)}),
        ("fc100", {"scratch": (38.4, 52.6, 58.6), "finetune": (41.6, 54.9, 61.6), "mtl": (43.6, 55.4, 62.4)}),
    ):
        for method, accuracies in values.items():
            for shots, acc in zip((1, 5, 10), accuracies):
                rows.append(PublishedResult(dataset, method, 5, shots, acc, None, "ResNet-12", _SUN_ABLATION))
                if method == "finetune":
                    # The slides' "finetune on pre-train model" is the ablation's FT [θ] row
                    # (θ meta-learned on the frozen pretrained backbone): `mtl bench --suite ablation`'s ft-head.
                    rows.append(PublishedResult(dataset, "ft-head", 5, shots, acc, None, "ResNet-12", _SUN_ABLATION))
    readme = "MTL official repository README (TensorFlow)"
    rows.append(PublishedResult("tiered-imagenet", "mtl", 5, 1, 65.6, 1.8, "ResNet-12", readme))
    rows.append(PublishedResult("tiered-imagenet", "mtl", 5, 5, 80.6, 0.9, "ResNet-12", readme))
    return rows


def _maml_rows() -> list[PublishedResult]:
    """MAML (Conv4)."""
    return [
        PublishedResult(dataset, "maml", ways, shots, acc, ci, backbone, source)
        for dataset, ways, shots, acc, ci, backbone, source in (
            ("mini-imagenet", 5, 1, 48.7, 1.8, "Conv4 (32)", _SUN_SLIDES),
            ("mini-imagenet", 5, 5, 63.1, 0.9, "Conv4 (32)", _SUN_SLIDES),
            ("omniglot", 5, 1, 98.7, 0.4, "Conv4", _MAML),
            ("omniglot", 5, 5, 99.9, 0.1, "Conv4", _MAML),
            ("omniglot", 20, 1, 95.8, 0.3, "Conv4", _MAML),
            ("cifarfs", 5, 1, 58.9, 1.9, "Conv4", _MAML_TABLES),
            ("cifarfs", 5, 5, 71.5, 1.0, "Conv4", _MAML_TABLES),
            ("fc100", 5, 1, 38.1, 1.7, "Conv4", _MAML_TABLES),
            ("fc100", 5, 5, 50.4, 1.0, "Conv4", _MAML_TABLES),
        )
    ]


def _protonet_rows() -> list[PublishedResult]:
    """ProtoNets (Conv4, episodic)."""
    return [
        PublishedResult(dataset, "protonet-conv4", 5, shots, acc, ci, "Conv4", source)
        for dataset, shots, acc, ci, source in (
            ("mini-imagenet", 1, 49.4, 0.8, _SUN_SLIDES),
            ("mini-imagenet", 5, 68.2, 0.7, _SUN_SLIDES),
            ("cifarfs", 1, 55.5, 0.7, _METAOPT),
            ("cifarfs", 5, 72.0, 0.6, _METAOPT),
            ("fc100", 1, 35.3, 0.6, _METAOPT),
            ("fc100", 5, 48.6, 0.6, _METAOPT),
        )
    ]


def _metanet_rows() -> list[PublishedResult]:
    """Meta Networks (5-layer convnets, 28 px Omniglot)."""
    rows = [
        PublishedResult("omniglot", "metanet", ways, 1, acc, None, "5-layer conv", _METANET)
        for ways, acc in ((5, 98.95), (10, 98.67), (15, 97.11), (20, 97.00))
    ]
    rows.append(PublishedResult("mini-imagenet", "metanet", 5, 1, 49.21, 0.96, "5-layer conv", _METANET))
    return rows


def _mtl_table_rows() -> list[PublishedResult]:
    """Matching Networks, Meta-LSTM (Conv4) and TADAM (ResNet-12), as the MTL paper's table gives them."""
    rows = []
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
                rows.append(PublishedResult(dataset, method, 5, shots, acc, ci, backbone, _SUN_SLIDES))
    return rows


def _cosine_finetune_rows() -> list[PublishedResult]:
    """Fine-tuning a cosine classifier with entropy regularisation (WRN-28-10); a CI on mini-ImageNet only."""
    rows = []
    for dataset, (one, five) in (
        ("mini-imagenet", (65.73, 78.40)),
        ("tiered-imagenet", (73.34, 85.50)),
        ("cifarfs", (76.58, 85.79)),
        ("fc100", (43.16, 57.57)),
    ):
        for shots, acc, ci in ((1, one, 0.68), (5, five, 0.52)):
            ci = ci if dataset == "mini-imagenet" else None
            rows.append(PublishedResult(dataset, "cosine-finetune", 5, shots, acc, ci, "WRN-28-10", _DHILLON))
    return rows


def _linear_probe_rows() -> list[PublishedResult]:
    """Logistic regression on pretrained features (RFS-simple, ResNet-12); tiered-ImageNet without a CI."""
    return [
        PublishedResult(dataset, "linear-probe", 5, shots, acc, ci, "ResNet-12", _RFS)
        for dataset, cells in (
            ("mini-imagenet", ((62.02, 0.63), (79.64, 0.44))),
            ("tiered-imagenet", ((69.74, None), (84.41, None))),
            ("cifarfs", ((71.5, 0.8), (86.0, 0.5))),
            ("fc100", ((42.6, 0.7), (59.1, 0.6))),
        )
        for shots, (acc, ci) in zip((1, 5), cells)
    ]


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
