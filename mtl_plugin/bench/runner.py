"""``mtl bench``: every method on the same seeded test tasks, as pandas tables.

For each shot setting, each method is fitted once, as a paper reports (a config
that asks for ``fits`` > 1: that many times, the cell their per-task mean; methods
built on the pretrained backbone share one cached pretraining run) and evaluated
on the very same test tasks; a cell reads ``mean ± 1.96·std/√n (n=tasks)``. The rows come from
a suite: ``comparison`` (the methods, the default) or ``ablation`` (what to adapt
after pretraining, with each row's learned parameters, a plot of accuracy against
them and the paper's claims checked on paired differences; see
:mod:`mtl_plugin.bench.ablation_report`); rows in both suites share their cells. Finished cells
are kept in ``out/cells/`` and reused, so a killed bench resumes where it was.
Cell files and the shared pretraining are named by a digest of everything that
changes their numbers (seed, profile, data set, budgets), so runs of different
settings share an ``out`` folder without overwriting each other. The CSV holds
results only, so the same seed gives a byte-identical CSV; the wall-clock of
each cell goes to the Markdown table and a separate timings CSV.

Example::

    from mtl_plugin.bench.runner import BenchConfig, run_bench
    config = BenchConfig.quick(methods=("protonet", "mtl"), shots=(1,))
    result = run_bench(config)
    print(result.table.to_string(index=False))
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from mtl_plugin.backbones import check_backbone
from mtl_plugin.bench.ablation_report import (
    ablation_note,
    learned_parameter_counts,
    plot_accuracy_vs_parameters,
)
from mtl_plugin.bench.config import (
    PROFILES,
    SUITE_CLAIMS,
    SUITES,
    BenchConfig,
    bench_config_from,
    describe,
    pretrain_config_for,
)
from mtl_plugin.bench.methods import build_method, fit_count, fit_settings, method_spec
from mtl_plugin.bench.published import published_accuracy
from mtl_plugin.bench.sharing import (
    announce_data,
    join,
    process_device,
    share_cells,
    wait_for_data,
    wait_for_pretraining,
)
from mtl_plugin.checks import check_output_dir
from mtl_plugin.data import get_benchmark
from mtl_plugin.data.benchmark import benchmark_identity, check_tasks
from mtl_plugin.data.leak import check_unseen, class_record
from mtl_plugin.evaluation import EvaluationConfig, EvaluationResult, evaluate
from mtl_plugin.training.pretrain import not_learning, pretrain
from mtl_plugin.training.pretrain_checkpoint import load_pretrained
from mtl_plugin.utils.distributed import WorkQueue
from mtl_plugin.utils.io import atomic_save_figure, atomic_write_text
from mtl_plugin.utils.plots import plot_meta_curves

# BenchConfig and its helpers live in bench.config; they stay importable from here.
__all__ = [
    "BenchConfig",
    "bench_config_from",
    "describe",
    "BenchResult",
    "PROFILES",
    "SUITES",
    "pretrain_config_for",
    "run_bench",
    "shared_pretraining",
    "work_dir",
]

WALL_CLOCK = "wall-clock (s)"
LEARNED = "learned parameters"


@dataclass
class BenchResult:
    """The table as printed, and the cells behind it."""

    table: pd.DataFrame
    cells: pd.DataFrame
    files: dict


def _device(name: str, queue: WorkQueue | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name) if queue is None else process_device(torch.device(name))


class _SharedPretraining:
    """Pretrains once (into ``run_dir``), on first use, and hands out fresh copies."""

    def __init__(self, run: Callable[[], nn.Module], run_dir: Path | None = None):
        self._run = run
        self._model: nn.Module | None = None
        self.seconds = 0.0
        self.run_dir = run_dir

    def __call__(self) -> nn.Module:
        if self._model is None:
            start = time.perf_counter()
            self._model = self._run()
            self.seconds = time.perf_counter() - start
        return copy.deepcopy(self._model)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _pretrain_key(config: BenchConfig, benchmark) -> dict:
    # Everything that changes the shared pretraining run, the images themselves included
    # (a new kanji generator gives new images under the same settings).
    return {
        "dataset": config.dataset,
        "root": config.root,
        "image_size": config.image_size,
        "seed": config.seed,
        "dataset_options": config.dataset_options,
        "data": benchmark_identity(benchmark),
        "pretrain": pretrain_config_for(config).record(),
    }


def _cell_key(config: BenchConfig, benchmark, method: str, shots: int, method_config: Any) -> dict:
    # Everything that changes a cell's number: a cached cell is reused only if all match. The
    # method's config too (that of the row built to run it): a budget or setting changed in a
    # new version must not reuse old cells.
    return {
        **_pretrain_key(config, benchmark),
        "ways": config.ways,
        "shots": shots,
        "queries": config.queries,
        "method": method,
        "method_config": asdict(method_config),
        "profile": config.profile,
        "test_tasks": config.test_tasks,
        "backbone": config.backbone,
    }


def work_dir(config: BenchConfig, benchmark, method: str, shots: int) -> Path:
    """The folder where ``method`` trains (and resumes) for one shot setting of ``config``
    on ``benchmark`` (the data set ``config`` names).

    Named by a digest of what changes the training (the test-task count does not), so that
    a run with another seed, budget or data never resumes from this one's checkpoints.

    Example::

        config = BenchConfig.quick()
        benchmark = get_benchmark(config.dataset, image_size=config.image_size, data_seed=config.data_seed)
        metrics = work_dir(config, benchmark, "mtl", 1) / "metrics.csv"
    """
    method_config = build_method(method, config.profile).config
    return _work_dir(config, method, shots, _cell_key(config, benchmark, method, shots, method_config), method_config)


def _work_dir(config: BenchConfig, method: str, shots: int, cell_key: dict, method_config: Any) -> Path:
    """:func:`work_dir` from the cell's key less the test-task count and the number of fits
    (:func:`~mtl_plugin.bench.methods.base.fit_settings`: a cell that averages more fits
    reuses those already trained)."""
    key = {k: v for k, v in cell_key.items() if k != "test_tasks"} | {"method_config": fit_settings(method_config)}
    return config.out / "work" / method / f"{config.ways}w{shots}s-{_digest(key)}"


def _cached_cell(path: Path, key: dict) -> dict | None:
    """The cell stored at ``path`` if it was computed for ``key``; a corrupt file counts as stale."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    # Cells written before rows could average fits hold one fit.
    return {"fits": 1, "fit_accuracies": [cached.get("accuracy")], **cached}


def _run_cell(config, benchmark, method_name, shots, shared, device) -> dict:
    # Built first: its config keys the cell (and is what runs if the cell is not cached).
    method = build_method(method_name, config.profile)
    key = _cell_key(config, benchmark, method_name, shots, method.config)
    path = config.out / "cells" / f"{method_name}-{config.ways}w{shots}s-{_digest(key)}.json"
    cached = _cached_cell(path, key)
    if cached is not None:
        return cached
    context = config.context(
        benchmark, shots, _work_dir(config, method_name, shots, key, method.config), device, shared
    )
    evaluation = EvaluationConfig(config.ways, shots, config.queries, config.test_tasks, config.seed)
    fits = fit_count(method.config)
    results, fit_seconds, eval_seconds = [], 0.0, 0.0
    for fit in range(fits):
        method = method if fit == 0 else build_method(method_name, config.profile)
        start, pretraining_before = time.perf_counter(), shared.seconds
        method.fit(context.for_fit(fit))
        # The shared pretraining runs inside the first fit that asks for it; it is reported once,
        # on its own, rather than charged to whichever method came first.
        fit_seconds += time.perf_counter() - start - (shared.seconds - pretraining_before)
        start = time.perf_counter()
        description = f"{method_name} {shots}-shot" + (f" fit {fit + 1}/{fits}" if fits > 1 else "")
        results.append(
            evaluate(method.predict, benchmark.test, evaluation, progress=config.progress, description=description)
        )
        eval_seconds += time.perf_counter() - start
    result = EvaluationResult.mean_of(results)
    cell = {
        "key": key,
        **result.as_dict(),
        "accuracies": result.accuracies,
        "fits": fits,
        "fit_accuracies": [r.mean for r in results],
        "backbone": method.describe_backbone() or config.backbone,
        "fit_seconds": fit_seconds,
        "eval_seconds": eval_seconds,
    }
    atomic_write_text(path, json.dumps(cell, indent=1))
    return cell


def _counts(cell) -> str:
    """``n=300``, or ``n=300, 3 fits`` for the mean of several fits."""
    return f"n={cell['tasks']}" + (f", {cell['fits']} fits" if cell["fits"] > 1 else "")


def _cell_line(cell: dict, method: str, ways: int, shots: int) -> str:
    return (
        f"{method} {ways}-way {shots}-shot: {cell['accuracy']:.2f} ± {cell['ci95']:.2f} "
        f"({_counts(cell)}, fit {cell['fit_seconds']:.0f} s, eval {cell['eval_seconds']:.0f} s)"
    )


def _fits_note(cells: pd.DataFrame) -> str:
    """What each fit of the cells that average several scored, one line per such row."""
    lines = []
    for method, mine in cells[cells["fits"] > 1].groupby("method", sort=False):
        each = "; ".join(
            f"{cell['shots']}-shot " + ", ".join(f"{a:.2f}" for a in cell["fit_accuracies"])
            for _, cell in mine.iterrows()
        )
        lines.append(f"{method}: the mean of {mine['fits'].iloc[0]} fits on the same tasks; each fit: {each}")
    return "\n".join(lines)


def _table(
    config: BenchConfig, cells: pd.DataFrame, standard: bool, dataset: str, counts: dict | None = None
) -> pd.DataFrame:
    """One row per method; with ``counts`` (the ablation suite) also what each row adapts and
    its learned-parameter count, beside the accuracy cells."""
    rows = []
    for method in config.rows:
        mine = cells[cells["method"] == method]
        spec = method_spec(method)
        row = {"method": method}
        if counts is not None:
            row["adapts"] = spec.adapts
        row.update(
            {"backbone": mine["backbone"].iloc[0], "setting": "transductive" if spec.transductive else "inductive"}
        )
        if counts is not None:
            row[LEARNED] = "—" if counts.get(method) is None else counts[method]
        for shots in config.shots:
            cell = mine[mine["shots"] == shots].iloc[0]
            row[f"{shots}-shot"] = f"{cell['accuracy']:.2f} ± {cell['ci95']:.2f} ({_counts(cell)})"
        if standard:
            for shots in config.shots:
                published = published_accuracy(dataset, method, config.ways, shots)
                row[f"published {shots}-shot"] = published.cell if published else "—"
        row[WALL_CLOCK] = round(float((mine["fit_seconds"] + mine["eval_seconds"]).sum()), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _pretraining_note(config: BenchConfig, benchmark, shared: _SharedPretraining) -> str:
    """A warning beside the rows that stand on a shared pretraining that did not learn; else ""."""
    rows = [m for m in config.rows if method_spec(m).uses_pretraining]
    metrics = shared.run_dir / "metrics.csv" if shared.run_dir else None
    if not rows or metrics is None or not metrics.is_file():
        return ""
    stalled = not_learning(
        pd.read_csv(metrics).to_dict("records"),
        len(benchmark.train_augmented.labels),
        pretrain_config_for(config).epochs,
    )
    return f"Warning: the shared pretraining of {', '.join(rows)}: {stalled}" if stalled else ""


def _plot(config: BenchConfig, cells: pd.DataFrame, path: Path) -> None:
    # The Figure API needs no pyplot backend: headless, and the caller's backend is left alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.2 + 0.9 * len(config.rows) * len(config.shots), 4))
    axis = figure.subplots()
    width = 0.8 / len(config.shots)
    for i, shots in enumerate(config.shots):
        mine = cells[cells["shots"] == shots].set_index("method").loc[list(config.rows)]
        positions = [m + i * width for m in range(len(config.rows))]
        axis.bar(positions, mine["accuracy"], width, yerr=mine["ci95"], capsize=3, label=f"{shots}-shot")
    axis.set_xticks([m + 0.4 - width / 2 for m in range(len(config.rows))], list(config.rows), rotation=30, ha="right")
    axis.set_ylabel(f"{config.ways}-way accuracy (%) ± 95% CI")
    axis.set_title(f"{config.dataset}, {config.test_tasks} test tasks, {config.profile} profile")
    axis.legend()
    atomic_save_figure(figure, path)


def _plot_curves(config: BenchConfig, benchmark, path: Path) -> bool:
    """mtl against mtl-ht: validation accuracy (the paper's faster-convergence claim), and the
    training accuracy of normal against hard tasks (hard tasks must be the harder ones)."""
    runs = []
    for method in ("mtl", "mtl-ht"):
        for shots in config.shots if method in config.rows else ():
            metrics = work_dir(config, benchmark, method, shots) / "metrics.csv"
            if metrics.exists():
                runs.append((f"{method} {shots}-shot", pd.read_csv(metrics)))
    if not runs:
        return False
    plot_meta_curves(runs, path, title="MTL with and without the hard-task meta-batch")
    return True


def _check_before_work(config: BenchConfig, benchmark) -> None:
    """Raise now, not after the shared pretraining, on what would fail later."""
    for shots in config.shots:
        check_tasks(benchmark, config.ways, shots + config.queries, splits=("val", "test"))
    check_backbone(config.backbone, benchmark.image_size)
    # Every row trains on the train split alone: a class that is also in val or test (an image
    # folder copied into two splits under two names) would make every cell a result on seen classes.
    check_unseen(class_record(benchmark.train, benchmark.name), benchmark, "every row (the train split)")
    for method in config.rows:
        fit_count(build_method(method, config.profile).config)
    check_output_dir(config.out)


def shared_pretraining(
    config: BenchConfig, benchmark, device: torch.device, queue: WorkQueue | None = None
) -> _SharedPretraining:
    """The bench's shared pretraining run in ``config.out``: run on first call (or read back
    when finished), then a fresh copy of the backbone per call. Under torchrun (``queue``),
    rank 0 runs it and the other ranks wait for it to finish and read its ``best.pt``.

    Example::

        pretrained = shared_pretraining(config, benchmark, torch.device("cpu"))
        backbone = pretrained()          # the same run `mtl bench --out config.out` uses
    """
    name = f"{benchmark.name}-{config.backbone}-{benchmark.image_size}px-{_digest(_pretrain_key(config, benchmark))}"
    pretrain_dir = config.out / "pretrain" / name
    if queue is not None and queue.rank != 0:

        def read_back() -> nn.Module:
            wait_for_pretraining(queue)
            return load_pretrained(pretrain_dir / "best.pt", device)

        return _SharedPretraining(read_back, pretrain_dir)
    return _SharedPretraining(
        lambda: pretrain(benchmark, pretrain_config_for(config), pretrain_dir, device=device, progress=config.progress),
        pretrain_dir,
    )


def run_bench(config: BenchConfig, echo: Callable[[str], None] = print) -> BenchResult | None:
    """Fit and evaluate every method of ``config``; write the table as CSV, Markdown and LaTeX.

    The task shape, the backbone and the output folder are checked before any training.
    Under torchrun the processes share the cells out (:mod:`~mtl_plugin.bench.sharing`):
    rank 0 returns the result, the other ranks ``None``.
    """
    queue = join()
    if queue is not None:
        # One progress bar at a time on the terminal the processes share; the others print a line per cell.
        config = replace(config, progress=config.progress and queue.rank == 0)
        wait_for_data(queue)
    benchmark = get_benchmark(
        config.dataset,
        root=config.root,
        image_size=config.image_size,
        data_seed=config.data_seed,
        **config.dataset_options,
    )
    _check_before_work(config, benchmark)
    device = _device(config.device, queue)
    shared = shared_pretraining(config, benchmark, device, queue)
    if queue is not None:
        announce_data(queue)
        share_cells(
            queue,
            [(method, shots) for shots in config.shots for method in config.rows],
            shared,
            lambda method, shots: _cell_line(
                _run_cell(config, benchmark, method, shots, shared, device), method, config.ways, shots
            ),
            echo,
        )
        if queue.rank != 0:
            return None
    # Under torchrun every cell is computed and announced by now: rank 0 reads them back silently.
    cells, accuracies = _all_cells(config, benchmark, shared, device, echo if queue is None else None)
    return _report(config, benchmark, shared, cells, accuracies, echo)


def _all_cells(
    config: BenchConfig,
    benchmark: Any,
    shared: _SharedPretraining,
    device: torch.device,
    echo: Callable[[str], None] | None,
) -> tuple[pd.DataFrame, dict]:
    """Every cell of the table, run or read back, in table order (and said through ``echo``, if given).

    Returns:
        The cells (one row each, without their key and per-task accuracies) and the per-task
        accuracies by ``(method, shots)``, for the paired claims.
    """
    records, accuracies = [], {}
    for shots in config.shots:
        for method in config.rows:
            cell = _run_cell(config, benchmark, method, shots, shared, device)
            accuracies[method, shots] = cell["accuracies"]
            if echo is not None:
                echo(_cell_line(cell, method, config.ways, shots))
            records.append(
                {"method": method, "shots": shots, **{k: v for k, v in cell.items() if k not in ("key", "accuracies")}}
            )
    return pd.DataFrame(records), accuracies


def _report(
    config: BenchConfig,
    benchmark: Any,
    shared: _SharedPretraining,
    cells: pd.DataFrame,
    accuracies: dict,
    echo: Callable[[str], None],
) -> BenchResult:
    """Write the table (CSV, Markdown, LaTeX), its timings, the claims and the plots; say the closing notes."""
    counts = learned_parameter_counts(config, benchmark, config.rows) if config.suite != "comparison" else None
    table = _table(config, cells, benchmark.standard, benchmark.name, counts)
    # The comparison keeps its file names; the ablation writes beside it in the same --out.
    stem = f"{benchmark.name}-{config.ways}way-{config.profile}" + ("-ablation" if config.suite == "ablation" else "")
    files = {kind: config.out / f"{stem}.{kind}" for kind in ("csv", "md", "tex")}
    files["timings"] = config.out / f"{stem}-timings.csv"
    stalled = _pretraining_note(config, benchmark, shared)
    # Results only: timings differ between machines, the results must not.
    atomic_write_text(files["csv"], table.drop(columns=[WALL_CLOCK]).to_csv(index=False))
    atomic_write_text(
        files["timings"],
        cells[["method", "shots", "fit_seconds", "eval_seconds"]].to_csv(index=False, float_format="%.1f"),
    )
    closing = _claims(config, stem, accuracies, counts, files)
    if counts is not None:
        files["parameters"] = config.out / f"{stem}-parameters.png"
        if not plot_accuracy_vs_parameters(
            cells, counts, files["parameters"], title=f"{benchmark.name}: what to adapt after pretraining"
        ):
            del files["parameters"]
    caption = _caption(config, benchmark, shared)
    note = _note(cells, stalled, benchmark.standard)
    atomic_write_text(
        files["md"], f"{caption}\n\n{table.to_markdown(index=False)}\n" + (f"\n{note}\n" if note else "") + closing
    )
    atomic_write_text(files["tex"], table.to_latex(index=False, caption=caption, label=f"tab:{stem}"))
    files["png"] = config.out / f"{stem}-accuracy.png"
    _plot(config, cells, files["png"])
    curves = config.out / f"{stem}-mtl-vs-mtl-ht.png"
    if _plot_curves(config, benchmark, curves):
        files["curves"] = curves
    if closing:
        echo(closing.rstrip())
    if stalled:
        echo(stalled)
    echo(f"shared pretraining: {shared.seconds:.0f} s (not in the methods' wall-clock)")
    return BenchResult(table=table, cells=cells, files=files)


def _claims(config: BenchConfig, stem: str, accuracies: dict, counts: dict | None, files: dict) -> str:
    """With an ``mtl`` row, check the suite's paired claims: write them (``files["claims"]``) and
    return the closing note on them; else ""."""
    if "mtl" not in config.rows:
        return ""
    files["claims"] = config.out / f"{stem}-claims.csv"
    comparisons, closing = ablation_note(accuracies, config.shots, counts, claims=SUITE_CLAIMS[config.suite])
    atomic_write_text(files["claims"], comparisons.to_csv(index=False))
    return closing


def _caption(config: BenchConfig, benchmark: Any, shared: _SharedPretraining) -> str:
    """The table's caption: what a cell is, and the shared pretraining's time, left out of the wall-clock."""
    return (
        f"{benchmark.name}, {config.ways}-way, mean accuracy (%) ± 95% CI over the same "
        f"{config.test_tasks} test tasks ({config.queries} queries per class), {config.profile} profile; "
        f"wall-clock = fit + evaluation, without the shared pretraining ({shared.seconds:.0f} s this run)"
    )


def _note(cells: pd.DataFrame, stalled: str, standard: bool) -> str:
    """The notes under the Markdown table: each fit of rows that average several, a shared
    pretraining that did not learn, and (on a standard benchmark) whose the published columns are."""
    published = (
        "published columns: other papers' numbers under their own protocols (mtl_plugin/bench/published.py), not ours"
        if standard
        else ""
    )
    return "\n\n".join(part for part in (_fits_note(cells), stalled, published) if part)
