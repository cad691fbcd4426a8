"""How far each row trained from scratch moves when its floats change, against its confidence interval.

Another CPU or torch thread count rounds floats differently; a row whose training amplifies
that moves between machines by more than the CI its table cell prints (issue 22). This fits
each row's quick profile on the embedded kanji data several times, the images shifted by
0, 1e-6, 2e-6, ... (a change of the floats as another CPU makes, cheaply and on one
machine), evaluates every fit on the same seeded validation tasks, and prints each row's
accuracies, their spread (largest minus smallest) and its CI: a row is stable when the spread
stays within the CI. The test split is never read. A row whose config asks for several fits
(``--set fits=3``, as a bench cell may) counts each mean of its fits as one run: the spread is
then that of what such a table cell holds. What each row's profile measured:
``docs/profiles.md``.

Beside the spread it prints the standard deviation between fits and what it implies, if fits
scatter normally: the chance that two fits (two CPUs) differ by more than the CI. The spread of
three to five fits is itself a rough measure (it grows with the number of fits), and so is a
standard deviation from so few. Each fit's mean training loss over its last quarter of episodes
is printed too: where the fits that reached a lower loss score higher, the spread is one of
training progress (the fits are still learning, and rounding set their pace), not of luck in
generalisation.

Fits live in ``--work-dir`` (one folder per row, shot setting and shift, named with a digest of
the row's config), so a killed run resumes, and each fit's result is kept beside it for a
rerun to read. Run one process per core with ``OMP_NUM_THREADS=1`` (the bench's setting) and
give them different ``--methods`` or ``--shots``; a last run over everything prints the table.

    OMP_NUM_THREADS=1 python benchmarks/float_spread.py --shots 1 --shots 5 --runs 3 \\
        [--methods maml --methods metanet] [--tasks 300] [--work-dir runs/float-spread] [--csv spread.csv]
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import click
import learn2learn as l2l
import pandas as pd
import torch
from torch.utils.data import Dataset

from mtl_plugin.bench.methods import build_method, fit_count, fit_settings, list_methods, method_spec
from mtl_plugin.bench.runner import BenchConfig
from mtl_plugin.data import get_benchmark
from mtl_plugin.evaluation import EvaluationConfig, EvaluationResult, evaluate

SHIFT = 1e-6
# The bench's quick profile: kanji at 28 px, Conv4 for the rows that take a backbone by name.
QUICK = BenchConfig.quick()


class Shifted(Dataset):
    """``dataset``'s ``(image + shift, label)`` pairs."""

    def __init__(self, dataset: Dataset, shift: float):
        self.dataset, self.shift = dataset, shift

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image + self.shift, label


def shifted(split: l2l.data.MetaDataset, shift: float) -> l2l.data.MetaDataset:
    """The same tasks as ``split`` (its class index is reused) on images moved by ``shift``."""
    if shift == 0.0:
        return split
    return l2l.data.MetaDataset(Shifted(split, shift), labels_to_indices=split.labels_to_indices)


def scratch_rows() -> list[str]:
    """The registered rows that train from scratch, in table order (the pretrained ones share
    one pretraining, which the bench's tables already show to move within their CIs)."""
    return [name for name in list_methods() if not method_spec(name).uses_pretraining]


def check_arguments(methods: tuple[str, ...], pairs: tuple[str, ...]) -> tuple[list[str], dict]:
    """The rows to fit and the config changes of ``--set FIELD=VALUE`` (values read as JSON).

    Raises:
        ValueError: a row that is not trained from scratch, or a change that is not
            ``FIELD=VALUE`` or names no field of a row's config.
    """
    known = scratch_rows()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"--methods {' '.join(unknown)}: not a row trained from scratch; choose from {known}")
    changes = {}
    for pair in pairs:
        field, equals, value = pair.partition("=")
        try:
            changes[field] = json.loads(value)
        except json.JSONDecodeError:
            equals = ""
        if not equals:
            raise ValueError(f"--set {pair}: give FIELD=VALUE, the value as JSON (e.g. --set max_episodes=1800)")
    rows = list(methods or known)
    for name in rows:
        try:
            replace(build_method(name, "quick").config, **changes)
        except TypeError:
            fields = sorted(asdict(build_method(name, "quick").config))
            raise ValueError(
                f"--set {' '.join(pairs)}: {name}'s config has no such field; its fields: {fields}"
            ) from None
    return rows, changes


def fit_and_validate(
    name: str,
    shots: int,
    shift: float,
    benchmark,
    *,
    work_dir: Path,
    split: str,
    tasks: int,
    ways: int,
    queries: int,
    seed: int,
    settings: dict | None = None,
) -> dict:
    """One run of row ``name`` on data shifted by ``shift``: its accuracy on ``tasks`` tasks of ``split``.

    A run is what the bench's cell holds: one fit, or the per-task mean of the fits a row's config
    asks for (:func:`~mtl_plugin.bench.methods.fit_count`; each fit with its own seed and folder).
    """
    config = replace(build_method(name, "quick").config, **(settings or {}))
    fits = fit_count(config)
    # The folder is named by what makes one fit, so that a run asking for more fits reuses those
    # already trained; the result file, the mean of the fits, by their number.
    digest = hashlib.sha256(json.dumps(fit_settings(config), sort_keys=True).encode()).hexdigest()[:10]
    work_dir = work_dir / f"{name}-{shots}shot-shift{shift:g}-{digest}"
    mean_of = f"-{fits}fits" if fits > 1 else ""
    result_file = work_dir / f"{split}-{ways}way-{tasks}tasks-{queries}queries-seed{seed}{mean_of}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    data = replace(benchmark, **{s: shifted(getattr(benchmark, s), shift) for s in ("train", "val", "test")})
    bench = replace(QUICK, ways=ways, queries=queries, seed=seed)
    context = bench.context(data, shots, work_dir, torch.device("cpu"), lambda: None, progress=False)
    evaluation = EvaluationConfig(ways, shots, queries, tasks, seed=seed)
    results, tails = [], []
    for fit in range(fits):
        method = build_method(name, "quick")
        method.config = config
        fit_context = context.for_fit(fit)
        fit_context.work_dir.mkdir(parents=True, exist_ok=True)
        method.fit(fit_context)
        results.append(evaluate(method.predict, getattr(data, split), evaluation, progress=False))
        losses = getattr(method, "losses", [])
        tail = losses[-max(len(losses) // 4, 1) :]
        tails.append(sum(tail) / len(tail) if tail else None)
    result = EvaluationResult.mean_of(results)
    row = {
        "method": name,
        "shots": shots,
        "shift": shift,
        "accuracy": result.mean,
        "ci95": result.ci95,
        "tail_loss": None if None in tails else sum(tails) / len(tails),
        "fit_accuracies": [r.mean for r in results],
    }
    result_file.write_text(json.dumps(row))
    return row


def beyond_ci(sd: float, ci: float) -> float:
    """The chance that two fits differ by more than ``ci`` if fits scatter normally with ``sd``.

    Their difference is normal with standard deviation ``sd * sqrt(2)``, so the chance is
    ``erfc(ci / (2 sd))``; 0 when the fits do not scatter at all.
    """
    return math.erfc(ci / (2 * sd)) if sd > 0 else 0.0


def spread_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per row and shot setting: each run's accuracy and training loss over its last quarter of
    episodes (``-`` where the method keeps none), the spread (max - min), the standard deviation
    between runs, the widest CI and :func:`beyond_ci` of the two."""
    if "tail_loss" not in runs:
        runs = runs.assign(tail_loss=None)
    rows = []
    for (name, shots), group in runs.groupby(["method", "shots"], sort=False):
        spread = group["accuracy"].max() - group["accuracy"].min()
        sd = float(group["accuracy"].std(ddof=1))
        ci = group["ci95"].max()
        rows.append(
            {
                "method": name,
                "shots": shots,
                "runs": " ".join(f"{a:.2f}" for a in group["accuracy"]),
                "tail losses": " ".join("-" if pd.isna(x) else f"{x:.3f}" for x in group["tail_loss"]),
                "spread": round(spread, 2),
                "sd": round(sd, 2),
                "ci95": round(ci, 2),
                "within CI": bool(spread <= ci),
                "P(two fits differ > CI)": round(beyond_ci(sd, ci), 2),
            }
        )
    return pd.DataFrame(rows)


@click.command()
@click.option("--methods", multiple=True, help="rows to fit (default: every row trained from scratch)")
@click.option("--shots", "shots_list", type=int, multiple=True, default=(1, 5), show_default=True)
@click.option(
    "--runs",
    type=click.IntRange(2),
    default=3,
    show_default=True,
    help="runs per row: shifts 0, 1e-6, ... (a run: one fit, or the mean of a row's `fits`)",
)
@click.option("--split", type=click.Choice(["val"]), default="val", show_default=True, help="never test")
@click.option("--tasks", type=click.IntRange(1), default=300, show_default=True)
@click.option("--ways", type=click.IntRange(2), default=5, show_default=True)
@click.option("--queries", type=click.IntRange(1), default=15, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/float-spread"), show_default=True)
@click.option("--set", "settings", multiple=True, help="FIELD=VALUE: change the rows' quick config (e.g. lr=2e-3)")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None, help="also write the table here")
def main(methods, shots_list, runs, split, tasks, ways, queries, seed, work_dir, settings, csv_path):
    """Fit each row several times on data moved by 1e-6 steps; print the spread of its val accuracy."""
    try:
        rows, changes = check_arguments(methods, settings)
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    benchmark = get_benchmark(QUICK.dataset, image_size=QUICK.image_size, data_seed=QUICK.data_seed, progress=False)
    print(
        f"float spread: {', '.join(rows)}, {ways}-way {'/'.join(map(str, shots_list))}-shot, "
        f"{runs} runs each (images shifted by 0 to {(runs - 1) * SHIFT:g}), {tasks} {split} tasks, "
        f"{torch.get_num_threads()} torch thread(s)" + (f"; quick config changed: {changes}" if changes else ""),
        flush=True,
    )
    results = []
    for name in rows:
        for shots in shots_list:
            for k in range(runs):
                row = fit_and_validate(
                    name,
                    shots,
                    k * SHIFT,
                    benchmark,
                    work_dir=work_dir,
                    split=split,
                    tasks=tasks,
                    ways=ways,
                    queries=queries,
                    seed=seed,
                    settings=changes,
                )
                print(
                    f"  {name} {shots}-shot shift {k * SHIFT:g}: {row['accuracy']:.2f} ± {row['ci95']:.2f}", flush=True
                )
                results.append(row)
    table = spread_table(pd.DataFrame(results))
    print(table.to_string(index=False))
    if csv_path is not None:
        table.to_csv(csv_path, index=False)


if __name__ == "__main__":
    main()
