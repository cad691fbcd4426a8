"""The paper's convergence figure, measured: validation accuracy against meta-iterations, paired.

Meta-trains each row (default ``mtl``, ``mtl-ht``, ``ft-all``, ``ss-last``) at each shot setting on
the bench's shared pretraining of ``--profile`` (``quick``: Conv4; ``deep``: ResNet-12 at half width;
the one ``mtl bench --profile P --out OUT`` uses: run once into ``--out`` or read back from it),
through the row's own ``fit(context)``, validating every
``--val-every`` iterations from iteration 0 (before any meta-update) to ``--iterations``. Every
validation uses the same seeded ``--val-tasks`` val tasks (``validation.csv`` of each run), so
points compare task by task: against ``mtl`` at the same shots and iteration (``diff_vs_mtl``)
and against the row's own iteration 0 (``gain_vs_start``), each a mean of per-task differences
± 1.96·std/√n. Every other meta-training setting is the profile's ``MTLConfig`` as the bench uses
it; only iterations, val_every, val_tasks, checkpoint_every (= val_every), lr_step (the halving
period of the outer lrs, default the profile's) and, with ``--autocast``, the encoder's precision
are replaced. The test split is never read.

Runs live in ``OUT/budget-curve/<row>-<shots>s/`` (``<profile>-<row>-<shots>s`` for another profile
than ``quick``, ``-<autocast>`` appended with ``--autocast``) and resume: a killed script continues, and a
rerun with a larger ``--iterations`` (same ``--val-every``, ``--val-tasks`` and ``--lr-step``)
extends the finished runs.

    MTL_DATA=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget_curve.py --out /tmp/bench-quick \\
        [--profile quick|deep] [--rows mtl,mtl-ht,ft-all,ss-last] [--shots 1,5] [--iterations 2000] \\
        [--val-every 250] [--val-tasks 600] [--lr-step N] [--autocast bf16] [--threads 1] [--csv PATH] [--png PATH]

Prints one line per run (seconds this call, the shared pretraining apart), the curve as a table
(validation accuracy ± 95% CI per row and iteration, one block per shot setting) and a closing
summary per shot setting: at which iterations each of ``ss-last``, ``ft-all`` and ``mtl-ht`` is
apart from ``mtl`` by more than the CI of the paired difference, and in which direction; and for
each row the iteration of its best validation accuracy and its gain over iteration 0; with ``--autocast``,
each run against the float32 run of the same row in ``--out``, paired. Writes the
CSV (long format: row, shots, iteration, accuracy, ci95, tasks, diff_vs_mtl, diff_vs_mtl_ci95,
gain_vs_start, gain_vs_start_ci95) and the PNG (one panel per shot setting, accuracy with 95% CI
error bars). Bad flags print one ``Error: ...`` line and exit with 2 before any work.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from mtl_plugin.backbones import check_backbone
from mtl_plugin.bench.ablation_report import paired_difference, paired_verdict
from mtl_plugin.bench.methods import METHODS, build_method, method_spec
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.mtl import MTL, MTLConfig
from mtl_plugin.bench.runner import BenchConfig, shared_pretraining
from mtl_plugin.checks import check_output_dir
from mtl_plugin.data import get_benchmark
from mtl_plugin.data.benchmark import check_tasks
from mtl_plugin.errors import DataError, NonFiniteLossError, UsageError
from mtl_plugin.evaluation import EvaluationResult
from mtl_plugin.speedups import AUTOCAST_DTYPES
from mtl_plugin.training.checkpoints import read_meta_checkpoint
from mtl_plugin.training.meta_training import VALIDATION_FILE
from mtl_plugin.utils.io import atomic_save_figure, atomic_write_text

REFERENCE = "mtl"
DEFAULT_ROWS = ("mtl", "mtl-ht", "ft-all", "ss-last")
# The rows the summary sets against the reference, in this order (others follow).
AGAINST = ("ss-last", "ft-all", "mtl-ht")
COLUMNS = [
    "row",
    "shots",
    "iteration",
    "accuracy",
    "ci95",
    "tasks",
    "diff_vs_mtl",
    "diff_vs_mtl_ci95",
    "gain_vs_start",
    "gain_vs_start_ci95",
]
# Settings of a run that a resumed run cannot change (meta_train refuses): checked before any work.
FIXED = {"val_every": "--val-every", "val_tasks": "--val-tasks", "lr_step": "--lr-step"}


def _curve_rows() -> tuple[str, ...]:
    """The rows meta-trained by ``MTL.fit`` with an ``MTLConfig``: the ones with a validation curve."""
    return tuple(
        name for name in METHODS if issubclass(method_spec(name).method, MTL) and method_spec(name).config is MTLConfig
    )


def _list(text: str, flag: str, kind: Callable = str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{flag} {text!r}: give one or more comma-separated values")
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated {kind.__name__} values, e.g. 1,5") from None
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        required=True,
        help="bench output folder holding (or to hold) the shared pretraining; runs go to "
        "OUT/budget-curve/<row>-<shots>s/",
    )
    parser.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)})"
    )
    parser.add_argument(
        "--profile",
        choices=("quick", "deep"),
        default="quick",
        help="whose shared pretraining, backbone and MTLConfig the curve builds on (default: quick)",
    )
    parser.add_argument("--shots", default="1,5", help="comma-separated shot settings (default: 1,5)")
    parser.add_argument("--iterations", type=int, default=2000, help="meta-iterations of each run (default: 2000)")
    parser.add_argument(
        "--val-every", type=int, default=250, help="validate (and checkpoint) every N iterations, from 0 (default: 250)"
    )
    parser.add_argument(
        "--val-tasks",
        type=int,
        default=600,
        help="seeded val tasks of every validation (default: 600, a CI of about ±1 at 1-shot)",
    )
    parser.add_argument(
        "--lr-step",
        type=int,
        default=None,
        help="halve the outer lrs every N iterations (default: the profile's MTLConfig's)",
    )
    parser.add_argument(
        "--autocast",
        choices=tuple(AUTOCAST_DTYPES),
        default=None,
        help="run the encoder under this autocast dtype (default: the profile's; runs go to their own folders)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda (default: auto)")
    parser.add_argument("--csv", default=None, help="the curve's CSV (default: OUT/budget-curve/budget-curve.csv)")
    parser.add_argument("--png", default=None, help="the figure (default: OUT/budget-curve/budget-curve.png)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Parse the list flags and check every flag before any work; raises :class:`UsageError`."""
    known = _curve_rows()
    args.rows = _list(args.rows, "--rows")
    unknown = [row for row in args.rows if row not in known]
    if unknown:
        raise UsageError(f"--rows: unknown row {unknown[0]!r}; rows with a meta-training curve: {', '.join(known)}")
    args.shots = _list(args.shots, "--shots", int)
    if min(args.shots) < 1:
        raise UsageError(f"--shots: {min(args.shots)} shots: give settings >= 1, e.g. 1,5")
    if args.iterations < 1:
        raise UsageError(f"--iterations {args.iterations}: give 1 or more")
    if not 1 <= args.val_every <= args.iterations:
        raise UsageError(f"--val-every {args.val_every}: give 1 to --iterations ({args.iterations})")
    if args.iterations % args.val_every:
        raise UsageError(
            f"--val-every {args.val_every} does not divide --iterations {args.iterations}: every "
            f"point of the curve must be a validation (e.g. --iterations "
            f"{math.ceil(args.iterations / args.val_every) * args.val_every})"
        )
    if args.val_tasks < 2:
        raise UsageError(f"--val-tasks {args.val_tasks}: a confidence interval needs at least 2 tasks")
    for flag in ("lr_step", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: give 1 or more")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise UsageError(f"--device {args.device!r}: give auto, cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return args


def _named(name: str, profile: str, autocast: str | None) -> str:
    # Marked with a profile other than quick and an autocast dtype: runs and files of other
    # settings never share a name.
    return ("" if profile == "quick" else f"{profile}-") + name + (f"-{autocast}" if autocast else "")


def run_dir(out: Path, row: str, shots: int, profile: str = "quick", autocast: str | None = None) -> Path:
    """Where ``row`` meta-trains at ``shots`` for the curve of ``profile`` (with ``autocast``, if given)."""
    return Path(out) / "budget-curve" / _named(f"{row}-{shots}s", profile, autocast)


def curve_config(
    base: MTLConfig,
    iterations: int,
    val_every: int,
    val_tasks: int,
    lr_step: int | None,
    autocast: str | None = None,
) -> MTLConfig:
    """``base`` (the profile's) with the curve's budget and, if given, ``autocast``; every other
    setting as it is."""
    speedups = base.speedups if autocast is None else replace(base.speedups, autocast=autocast)
    meta = replace(
        base.meta,
        iterations=iterations,
        val_every=val_every,
        val_tasks=val_tasks,
        checkpoint_every=val_every,
        lr_step=base.meta.lr_step if lr_step is None else lr_step,
    )
    return replace(base, meta=meta, speedups=speedups)


def check_existing_runs(plans: list[tuple[str, int, MTL, BenchContext]]) -> None:
    """Refuse now, not after other rows trained, a run folder whose run was made under other curve flags."""
    for row, shots, method, context in plans:
        last = Path(context.work_dir) / "last.pt"
        if not last.is_file():
            continue
        saved = read_meta_checkpoint(last, "--out").get("config", {})
        meta = method.meta_config(context)
        for name, flag in FIXED.items():
            if name in saved and saved[name] != getattr(meta, name):
                raise UsageError(
                    f"{context.work_dir} holds a {shots}-shot {row} run made with {flag} {saved[name]} "
                    f"(now {getattr(meta, name)}): give {flag} {saved[name]} to extend it, or "
                    f"another --out"
                )


def read_validation(path: Path, iterations: int) -> pd.DataFrame:
    """A run's per-task validation accuracies up to ``iterations`` (``iteration, task, accuracy``)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the run's per-task validation accuracies: {error}") from error
    return frame[frame["iteration"] <= iterations]


def curve_frame(per_task: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """The curve in long format (:data:`COLUMNS`) from per-task accuracies.

    Args:
        per_task: ``row, shots, iteration, task, accuracy``, every validation over the same tasks.
        reference: the row the other rows are paired against (``diff_vs_mtl``; NaN for itself
            and where it has no validation at that iteration).

    ``accuracy`` and ``ci95`` are :class:`~mtl_plugin.evaluation.EvaluationResult`'s (as
    ``metrics.csv`` records them); the paired columns are
    :func:`~mtl_plugin.bench.ablation_report.paired_difference` of the per-task accuracies, and
    ``gain_vs_start`` is NaN for a run without an iteration 0.
    """
    accuracies = {
        key: list(group.sort_values("task")["accuracy"])
        for key, group in per_task.groupby(["row", "shots", "iteration"], sort=False)
    }
    rows = []
    for (row, shots, iteration), mine in accuracies.items():
        result = EvaluationResult(mine)
        against = accuracies.get((reference, shots, iteration)) if row != reference else None
        start = accuracies.get((row, shots, 0))
        diff = paired_difference(mine, against) if against is not None else (math.nan, math.nan)
        gain = paired_difference(mine, start) if start is not None else (math.nan, math.nan)
        rows.append(
            {
                "row": row,
                "shots": int(shots),
                "iteration": int(iteration),
                "accuracy": result.mean,
                "ci95": result.ci95,
                "tasks": len(mine),
                "diff_vs_mtl": diff[0],
                "diff_vs_mtl_ci95": diff[1],
                "gain_vs_start": gain[0],
                "gain_vs_start_ci95": gain[1],
            }
        )
    return (
        pd.DataFrame(rows, columns=COLUMNS)
        .sort_values(["shots", "row", "iteration"], kind="stable", key=_row_order)
        .reset_index(drop=True)
    )


def _row_order(column: pd.Series) -> pd.Series:
    # mtl first, then the default rows in their order, then any other row by name.
    if column.name != "row":
        return column
    order = list(dict.fromkeys((REFERENCE, *DEFAULT_ROWS, *sorted(set(column)))))
    return column.map(order.index)


def _signed(difference: float, ci: float) -> str:
    return f"{difference:+.2f} ± {ci:.2f}"


def summary(frame: pd.DataFrame, reference: str = REFERENCE) -> list[str]:
    """The closing summary of a curve frame (the CSV's columns), one block per shot setting.

    For each row other than ``reference`` (``ss-last``, ``ft-all``, ``mtl-ht`` first): the
    iterations at which its paired difference to ``reference`` is beyond its CI, above or below;
    for each row: the iteration of its best validation accuracy and its gain over iteration 0.

    Example::

        for line in summary(pd.read_csv("budget-curve.csv")):
            print(line)
    """
    lines = [
        "Summary: paired differences over the same val tasks, in points, ± 95% CI (1.96·std/√n of the "
        "per-task differences)."
    ]
    for shots, mine in frame.groupby("shots", sort=True):
        rows = list(dict.fromkeys(mine["row"]))
        lines.append(f"{shots}-shot:")
        others = [r for r in AGAINST if r in rows] + [r for r in rows if r not in AGAINST and r != reference]
        for row in others:
            if reference not in rows:
                lines.append(f"  {row} vs {reference}: no {reference} run at {shots}-shot, nothing to pair with")
                continue
            points = mine[(mine["row"] == row) & mine["diff_vs_mtl"].notna()]
            apart = {"holds": [], "reversed": []}
            for _, point in points.iterrows():
                difference, ci = point["diff_vs_mtl"], point["diff_vs_mtl_ci95"]
                verdict = paired_verdict(difference, ci)
                if verdict in apart:
                    apart[verdict].append(f"{int(point['iteration'])} ({_signed(difference, ci)})")
            if not len(points):
                lines.append(f"  {row} vs {reference}: no iteration validated by both")
            elif not apart["holds"] and not apart["reversed"]:
                lines.append(
                    f"  {row} vs {reference}: within the CI at every iteration "
                    f"({', '.join(str(int(i)) for i in points['iteration'])})"
                )
            else:
                parts = [
                    f"above at {', '.join(apart['holds'])}" if apart["holds"] else "",
                    f"below at {', '.join(apart['reversed'])}" if apart["reversed"] else "",
                ]
                lines.append(
                    f"  {row} vs {reference}: {'; '.join(p for p in parts if p)}; within the CI at the "
                    f"other {len(points) - len(apart['holds']) - len(apart['reversed'])} of "
                    f"{len(points)} iterations"
                )
        for row in rows:
            curve = mine[mine["row"] == row]
            best = curve.loc[curve["accuracy"].idxmax()]
            gain = (
                f"{_signed(best['gain_vs_start'], best['gain_vs_start_ci95'])} over iteration 0"
                if pd.notna(best["gain_vs_start"])
                else "no iteration 0 to compare with"
            )
            start = curve[curve["iteration"] == 0]
            opening = f" ({start['accuracy'].iloc[0]:.2f} %)" if len(start) else ""
            lines.append(
                f"  {row}: best {best['accuracy']:.2f} ± {best['ci95']:.2f} % at iteration "
                f"{int(best['iteration'])}, {gain}{opening}"
            )
    return lines


def curve_table(frame: pd.DataFrame) -> str:
    """The curve as printed: per shot setting, iterations down, rows across, ``accuracy ± ci95``."""
    blocks = []
    for shots, mine in frame.groupby("shots", sort=True):
        cells = mine.assign(cell=[f"{a:.2f} ± {c:.2f}" for a, c in zip(mine["accuracy"], mine["ci95"])])
        table = cells.pivot(index="iteration", columns="row", values="cell")[list(dict.fromkeys(mine["row"]))]
        table.columns.name = None
        tasks = ", ".join(str(n) for n in sorted(set(mine["tasks"])))
        blocks.append(
            f"{shots}-shot, validation accuracy (%) ± 95% CI over {tasks} val tasks:\n{table.fillna('-').to_string()}"
        )
    return "\n\n".join(blocks)


def plot_curve(frame: pd.DataFrame, path: Path, title: str = "") -> None:
    """One panel per shot setting: validation accuracy with 95% CI error bars against iteration, one line per row.

    The rows' points are set a little apart along x so that overlapping error bars stay readable.
    """
    # The Figure API needs no pyplot backend: headless, and the caller's backend is left alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    settings = sorted(set(frame["shots"]))
    figure = Figure(figsize=(5.5 * len(settings), 4.2), layout="constrained")
    axes = figure.subplots(1, len(settings), squeeze=False)[0]
    for axis, shots in zip(axes, settings):
        mine = frame[frame["shots"] == shots]
        rows = list(dict.fromkeys(mine["row"]))
        iterations = sorted(set(mine["iteration"]))
        spacing = min((b - a for a, b in zip(iterations, iterations[1:])), default=1)
        for index, row in enumerate(rows):
            curve = mine[mine["row"] == row]
            dodge = (index - (len(rows) - 1) / 2) * 0.04 * spacing
            axis.errorbar(
                curve["iteration"] + dodge,
                curve["accuracy"],
                yerr=curve["ci95"],
                marker="o",
                markersize=3,
                capsize=2,
                linewidth=1.2,
                color=f"C{index}",
                label=row,
            )
        axis.set_title(f"{shots}-shot")
        axis.set_xlabel("meta-training iteration")
        axis.set_ylabel("validation accuracy (%) ± 95% CI")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    atomic_save_figure(figure, path)


def run_curves(
    plans: list[tuple[str, int, MTL, BenchContext]], iterations: int, echo: Callable[[str], None] = print
) -> pd.DataFrame:
    """Fit (or extend, or read back) every planned run; their per-task validation accuracies."""
    frames = []
    for row, shots, method, context in plans:
        # The shared pretraining runs inside the first fit that asks for it: reported apart.
        pretraining_before = getattr(context.pretrained_backbone, "seconds", 0.0)
        start = time.perf_counter()
        method.fit(context)
        pretraining = getattr(context.pretrained_backbone, "seconds", 0.0) - pretraining_before
        seconds = time.perf_counter() - start - pretraining
        validation = read_validation(Path(context.work_dir) / VALIDATION_FILE, iterations)
        done = sorted(set(validation["iteration"]))
        echo(
            f"{row} {shots}-shot: validated at {len(done)} iterations ({done[0] if done else '-'}.."
            f"{done[-1] if done else '-'}), {seconds:.1f} s this call"
            + (f" (+ {pretraining:.0f} s shared pretraining)" if pretraining >= 1 else "")
            + f", {context.work_dir}"
        )
        frames.append(validation.assign(row=row, shots=shots))
    return pd.concat(frames, ignore_index=True)[["row", "shots", "iteration", "task", "accuracy"]]


def main(argv: list[str] | None = None, bench: BenchConfig | None = None, mtl: MTLConfig | None = None) -> pd.DataFrame:
    """Run the curve the flags ask for, print it and its summary, write the CSV and the PNG.

    ``bench`` (default ``--profile``'s ``BenchConfig``; ``out`` and ``progress`` come from the
    flags) and ``mtl`` (default the profile's ``MTLConfig``) are the configs the curve builds on,
    for callers (tests) that need smaller ones. Returns the curve frame.
    """
    args = parse_args(argv)
    try:
        args = check_args(args)
        bench = bench or (BenchConfig.deep() if args.profile == "deep" else BenchConfig.quick())
        return _main(args, bench, mtl or build_method("mtl", args.profile).config)
    except UsageError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataError, NonFiniteLossError) as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _main(args: argparse.Namespace, bench: BenchConfig, mtl: MTLConfig) -> pd.DataFrame:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = replace(bench, out=Path(args.out), shots=tuple(args.shots), progress=args.progress)
    out = check_output_dir(config.out, "--out")
    stem = _named("budget-curve", args.profile, args.autocast)
    csv_path = Path(args.csv) if args.csv else out / "budget-curve" / f"{stem}.csv"
    png_path = Path(args.png) if args.png else out / "budget-curve" / f"{stem}.png"
    benchmark = get_benchmark(
        config.dataset,
        root=config.root,
        image_size=config.image_size,
        data_seed=config.data_seed,
        **config.dataset_options,
    )
    for shots in config.shots:
        check_tasks(benchmark, config.ways, shots + config.queries, splits=("train", "val"))
    check_backbone(config.backbone, benchmark.image_size)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    method_config = curve_config(mtl, args.iterations, args.val_every, args.val_tasks, args.lr_step, args.autocast)
    pretrained = shared_pretraining(config, benchmark, device)
    plans = []
    for shots in config.shots:
        for row in args.rows:
            context = config.context(
                benchmark, shots, run_dir(out, row, shots, args.profile, args.autocast), device, pretrained
            )
            plans.append((row, shots, METHODS[row][0](method_config), context))
    check_existing_runs(plans)
    meta = method_config.meta
    print(
        f"budget curve: {', '.join(args.rows)} at {', '.join(f'{s}-shot' for s in config.shots)}, "
        f"{config.ways}-way, {config.queries} queries, {benchmark.name} {benchmark.image_size} px, "
        f"{config.backbone}{', autocast ' + args.autocast if args.autocast else ''}; "
        f"{args.iterations} iterations, validation every {args.val_every} on "
        f"{args.val_tasks} val tasks, outer lrs halved every {meta.lr_step} iterations "
        f"(x{meta.lr_gamma ** (args.iterations // meta.lr_step):.2g} by iteration {args.iterations}); {device}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    per_task = run_curves(plans, args.iterations, echo=lambda line: print(line, flush=True))
    frame = curve_frame(per_task)
    atomic_write_text(csv_path, frame.to_csv(index=False, float_format="%.4f"))
    plot_curve(
        frame,
        png_path,
        title=f"{benchmark.name}, {config.ways}-way, {config.backbone}: validation accuracy "
        f"over the same {args.val_tasks} val tasks",
    )
    print()
    print(curve_table(frame))
    print()
    for line in summary(frame):
        print(line)
    if args.autocast:
        for line in precision_summary(out, args.profile, args.autocast, per_task):
            print(line)
    print(f"wrote {csv_path} and {png_path}")
    return frame


def precision_summary(out: Path, profile: str, autocast: str, per_task: pd.DataFrame) -> list[str]:
    """Each autocast run against the float32 run of the same row, shots and profile in ``out`` (if
    there is one): the paired difference over the same val tasks at every iteration both validated."""
    lines = [f"{autocast} against float32, paired over the same val tasks (points, ± 95% CI):"]
    for (row, shots), mine in per_task.groupby(["row", "shots"], sort=False):
        path = run_dir(out, row, shots, profile) / VALIDATION_FILE
        if not path.is_file():
            lines.append(f"  {row} {shots}-shot: no float32 run in {path.parent}")
            continue
        exact = read_validation(path, int(mine["iteration"].max()))
        points = []
        for iteration, group in mine.groupby("iteration"):
            other = exact[exact["iteration"] == iteration].sort_values("task")["accuracy"]
            if len(other) == len(group):
                difference, ci = paired_difference(list(group.sort_values("task")["accuracy"]), list(other))
                points.append(f"{iteration}: {_signed(difference, ci)} ({paired_verdict(difference, ci)})")
        lines.append(f"  {row} {shots}-shot: " + ("; ".join(points) or "no iteration validated by both"))
    return lines


if __name__ == "__main__":
    main()
