"""What ``mtl bench --suite ablation`` adds to the table: learned parameters, paired comparisons, a plot.

* :func:`learned_parameter_counts`: how many parameters each row's outer loop
  updates, from the architecture alone (no training);
* :func:`paired_comparisons`: the ablation's claims (SS against FT, every layer
  against the last block, HT against plain meta-batches, pretrained against
  scratch) as paired differences over the very same test tasks, each with its
  95% CI and whether the claim holds, is reversed, or is within the CI
  (:func:`paired_difference` and :func:`paired_verdict`, for any two lists of
  per-task accuracies over the same tasks);
* :func:`plot_accuracy_vs_parameters`: accuracy against learned parameters
  (log scale), one marker per shot setting.

Example::

    counts = learned_parameter_counts(config, benchmark, ("mtl", "ft-all"))
    frame = paired_comparisons(accuracies, shots=(1, 5))
    plot_accuracy_vs_parameters(cells, counts, "ablation.png", title="kanji")
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch

from mtl_plugin.backbones import build_backbone
from mtl_plugin.bench.methods import build_method
from mtl_plugin.utils.io import atomic_save_figure

__all__ = [
    "CLAIMS",
    "COMPARISON_CLAIMS",
    "ablation_note",
    "learned_parameter_counts",
    "paired_comparisons",
    "paired_difference",
    "paired_verdict",
    "plot_accuracy_vs_parameters",
]

# (claim as the paper makes it, the row it says is better, the row it says is worse)
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("SS beats FT on every layer", "mtl", "ft-all"),
    ("SS beats FT on the last block", "ss-last", "ft-last"),
    ("SS on every layer beats SS on the last block", "mtl", "ss-last"),
    ("meta-learning SS beats meta-learning the head alone", "mtl", "ft-head"),
    ("the hard-task meta-batch helps (resample)", "mtl-ht", "mtl"),
    ("the hard-task meta-batch helps (reuse)", "mtl-ht-reuse", "mtl"),
    ("meta-transfer beats training from scratch", "mtl", "scratch"),
)
# The comparison suite's claims: the paper's main table, and the baselines later work measured MTL
# against (a nearest-class-mean or a linear probe on the same pretrained embedding).
COMPARISON_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("meta-transfer beats fine-tuning the pretrained model", "mtl", "finetune"),
    ("meta-transfer beats nearest-class-mean on its own embedding", "mtl", "protonet"),
    ("meta-transfer beats a linear probe on its own embedding (RFS-simple)", "mtl", "linear-probe"),
    ("meta-transfer beats episodic ProtoNets", "mtl", "protonet-conv4"),
    ("meta-transfer beats MAML", "mtl", "maml"),
    ("meta-transfer beats training from scratch", "mtl", "scratch"),
    ("the hard-task meta-batch helps (resample)", "mtl-ht", "mtl"),
)


def learned_parameter_counts(config, benchmark, methods: Iterable[str]) -> dict[str, int | None]:
    """Parameters each row's outer loop updates; ``None`` for rows that meta-learn nothing countable.

    Args:
        config: the :class:`~mtl_plugin.bench.runner.BenchConfig` (backbone, ways, profile, seed).
        benchmark: its data set (channels and image size fix the backbone's shape).
        methods: the rows.

    Returns:
        ``{method: count or None}``; counts come from an untrained backbone of the
        bench's architecture, since only shapes matter.

    Example::

        learned_parameter_counts(BenchConfig.quick(), benchmark, ["mtl"])   # {"mtl": 12672}
    """

    def architecture():
        return build_backbone(config.backbone, in_channels=benchmark.channels, image_size=benchmark.image_size)

    context = config.context(benchmark, config.shots[0], Path("."), torch.device("cpu"), architecture, progress=False)
    counts = {}
    for name in methods:
        method = build_method(name, config.profile)
        counts[name] = method.learned_parameters(context) if hasattr(method, "learned_parameters") else None
    return counts


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The mean of ``a - b`` over the same tasks (in order) and its 95% CI, 1.96·std/√n of the differences.

    The std is the sample one (n - 1); one task gives an infinite CI.

    Raises:
        ValueError: ``a`` and ``b`` differ in length (not the same tasks) or are empty.

    Example::

        mean, ci95 = paired_difference([60.0, 40.0], [50.0, 40.0])   # 5.0, 9.8
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired differences need the same tasks on both sides: {len(a)} against {len(b)}")
    differences = torch.tensor(list(a), dtype=torch.float64) - torch.tensor(list(b), dtype=torch.float64)
    mean = differences.mean().item()
    ci = 1.96 * differences.std().item() / math.sqrt(len(differences)) if len(differences) > 1 else math.inf
    return mean, ci


def paired_verdict(difference: float, ci95: float) -> str:
    """ "holds" when the CI of a paired difference is above 0, "reversed" below 0, else "within CI"."""
    return "holds" if difference - ci95 > 0 else "reversed" if difference + ci95 < 0 else "within CI"


def paired_comparisons(
    accuracies: dict[tuple[str, int], list[float]], shots: Iterable[int], pairs: Iterable[tuple[str, str, str]] = CLAIMS
) -> pd.DataFrame:
    """Claims tested on the per-task accuracies of the same seeded test tasks.

    Args:
        accuracies: ``{(method, shots): [accuracy of test task i, ...]}``, every
            row over the same tasks in the same order.
        shots: the shot settings to compare.
        pairs: ``(claim, better, worse)`` triples; default: the ablation's :data:`CLAIMS`.

    Returns:
        One row per claim and shot setting whose two rows were run: ``claim,
        shots, better, worse, difference`` (mean of better - worse, in points),
        ``ci95`` (1.96·std/√n of the paired differences) and ``verdict``: "holds"
        (the CI is above 0), "reversed" (below 0) or "within CI".

    Example::

        frame = paired_comparisons({("mtl", 1): [60.0, 40.0], ("ft-all", 1): [50.0, 40.0]}, shots=(1,))
    """
    pairs = tuple(pairs)
    rows = []
    for shot in shots:
        for claim, better, worse in pairs:
            a, b = accuracies.get((better, shot)), accuracies.get((worse, shot))
            if a is None or b is None:
                continue
            if len(a) != len(b):
                raise ValueError(f"{better} and {worse} ({shot}-shot) were not evaluated on the same tasks")
            mean, ci = paired_difference(a, b)
            rows.append(
                {
                    "claim": claim,
                    "shots": shot,
                    "better": better,
                    "worse": worse,
                    "difference": round(mean, 2),
                    "ci95": round(ci, 2),
                    "verdict": paired_verdict(mean, ci),
                }
            )
    return pd.DataFrame(rows, columns=["claim", "shots", "better", "worse", "difference", "ci95", "verdict"])


def plot_accuracy_vs_parameters(
    cells: pd.DataFrame, counts: dict[str, int | None], path: str | Path, title: str = ""
) -> bool:
    """Accuracy ± CI against learned parameters (log scale), one marker per shot setting.

    Args:
        cells: one row per (method, shots) with ``accuracy`` and ``ci95``.
        counts: :func:`learned_parameter_counts` (rows counted ``None`` are left out).
        path: the PNG to write (atomically).
        title: the figure's title.

    Returns:
        Whether there was anything to plot (and a file was written).

    Example::

        plot_accuracy_vs_parameters(result.cells, counts, "out/ablation-parameters.png")
    """
    # The Figure API needs no pyplot backend: headless, and the caller's backend is left alone.
    from matplotlib.figure import Figure

    counted = cells[cells["method"].map(lambda m: counts.get(m) is not None)]
    if counted.empty:
        return False
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    markers = "osD^vP*X"
    for index, (shot, group) in enumerate(counted.groupby("shots")):
        x = [counts[m] for m in group["method"]]
        axis.errorbar(
            x, group["accuracy"], yerr=group["ci95"], fmt=markers[index % len(markers)], capsize=3, label=f"{shot}-shot"
        )
        if index == 0:  # one label per row is enough; the other settings sit on the same verticals
            placed: list[tuple[float, float]] = []
            for xi, yi, method in zip(x, group["accuracy"], group["method"]):
                # Rows with the same count and close accuracies (mtl and its variants) stack their labels.
                stacked = sum(1 for px, py in placed if px == xi and abs(py - yi) < 2)
                placed.append((xi, yi))
                axis.annotate(method, (xi, yi), textcoords="offset points", xytext=(4, 4 + 8 * stacked), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("learned parameters (what the outer loop updates), log scale")
    axis.set_ylabel("accuracy (%) ± 95% CI")
    axis.grid(True, alpha=0.3)
    axis.legend()
    if title:
        axis.set_title(title)
    atomic_save_figure(figure, path)
    return True


def _signed(row) -> str:
    return f"{row['difference']:+.2f} ± {row['ci95']:.2f}"


def ablation_note(
    accuracies: dict[tuple[str, int], list[float]],
    shots: Iterable[int],
    counts: dict[str, int | None] | None = None,
    reference: str = "mtl",
    claims: Iterable[tuple[str, str, str]] = CLAIMS,
) -> tuple[pd.DataFrame, str]:
    """The closing note of a bench table: which rows differ from ``reference``, and which claims hold.

    Args:
        accuracies: per-task accuracies as for :func:`paired_comparisons`.
        shots: the shot settings.
        counts: :func:`learned_parameter_counts` of the rows (the ablation suite), or ``None``.
        reference: the row every other row is compared with (SS [Θ; θ]).
        claims: ``(claim, better, worse)`` triples; those whose rows did not run are left out
            (:data:`CLAIMS` for the ablation, :data:`COMPARISON_CLAIMS` for the comparison).

    Returns:
        The comparisons (the claims, then every row against ``reference``) as a
        DataFrame, and the note as Markdown.

    Example::

        frame, note = ablation_note(accuracies, (1, 5), counts)
        print(note)
    """
    shots = tuple(shots)
    claims = paired_comparisons(accuracies, shots, claims)
    rows = sorted({method for method, _ in accuracies} - {reference})
    against = paired_comparisons(accuracies, shots, [(f"{m} vs {reference}", m, reference) for m in rows])
    lines = [
        "",
        "Closing note: paired differences over the same test tasks, in points, ± 95% CI "
        "(1.96·std/√n of the per-task differences).",
        "",
    ]
    for shot in shots:
        mine = against[against["shots"] == shot]
        apart = [f"{r['better']} ({_signed(r)})" for _, r in mine.iterrows() if r["verdict"] != "within CI"]
        within = [r["better"] for _, r in mine.iterrows() if r["verdict"] == "within CI"]
        if len(mine):
            lines.append(
                f"- {shot}-shot, rows apart from {reference} by more than the CI: "
                f"{', '.join(apart) or 'none'}; within the CI: {', '.join(within) or 'none'}."
            )
    for _, r in claims.iterrows():
        lines.append(f"- {r['claim']} ({r['better']} − {r['worse']}), {r['shots']}-shot: {_signed(r)}: {r['verdict']}.")
    ss, ft = (counts or {}).get(reference), (counts or {}).get("ft-all")
    if ss and ft:
        lines.append(
            f"- SS learns far fewer parameters than FT: {reference} {ss:,} against ft-all {ft:,} "
            f"({100 * ss / ft:.1f}%)."
        )
    frame = pd.concat([f for f in (claims, against) if len(f)] or [claims], ignore_index=True)
    return frame, "\n".join(lines) + "\n"
