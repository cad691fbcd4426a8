"""benchmarks/budget_curve.py on a tiny bench: the curve's points, its paired columns, extension, summary, bad flags."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from benchmark_scripts import loaded_script

from mtl_plugin.bench.methods.mtl import MTLConfig
from mtl_plugin.bench.runner import BenchConfig
from mtl_plugin.training.meta_step import MetaTrainer
from mtl_plugin.training.pretrain import PretrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BENCH = dict(
    dataset="kanji",
    dataset_options={"num_classes": 30, "instances": 6},
    queries=3,
    backbone="conv4",
    pretrain=PretrainConfig(backbone="conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2, val_queries=3),
)


def tiny_mtl() -> MTLConfig:
    quick = MTLConfig.quick()
    return replace(quick, meta=replace(quick.meta, inner_steps=2, test_inner_steps=3))


@pytest.fixture(scope="module")
def curve():
    yield from loaded_script("budget_curve.py")


@pytest.fixture()
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))
    return tmp_path


def _run(curve, out: Path, iterations: int, *extra: str) -> pd.DataFrame:
    argv = [
        "--out",
        str(out),
        "--rows",
        "mtl,ss-last",
        "--shots",
        "1",
        "--iterations",
        str(iterations),
        "--val-every",
        "2",
        "--val-tasks",
        "3",
        "--no-progress",
        *extra,
    ]
    return curve.main(argv, bench=BenchConfig.quick(**TINY_BENCH), mtl=tiny_mtl())


def test_curve_points_paired_columns_and_extension(curve, data_home, monkeypatch, capsys):
    out = data_home / "out"
    first = _run(curve, out, 4)
    written = pd.read_csv(out / "budget-curve" / "budget-curve.csv")
    assert list(written.columns) == curve.COLUMNS
    assert (out / "budget-curve" / "budget-curve.png").stat().st_size > 0
    for row in ("mtl", "ss-last"):
        mine = written[written["row"] == row]
        assert list(mine["iteration"]) == [0, 2, 4] and (mine["tasks"] == 3).all() and (mine["shots"] == 1).all()
        start = mine[mine["iteration"] == 0].iloc[0]
        assert start["gain_vs_start"] == 0 and start["gain_vs_start_ci95"] == 0
        assert mine["gain_vs_start"].notna().all()
    assert written[written["row"] == "mtl"]["diff_vs_mtl"].isna().all()
    other = written[written["row"] == "ss-last"]
    assert other["diff_vs_mtl"].map(math.isfinite).all() and other["diff_vs_mtl_ci95"].map(math.isfinite).all()
    printed = capsys.readouterr().out
    assert "1-shot, validation accuracy" in printed and "ss-last vs mtl:" in printed and "mtl: best" in printed

    # A rerun with more iterations continues each run from its iteration 4: two meta-steps per row.
    steps = []
    step = MetaTrainer.step
    monkeypatch.setattr(MetaTrainer, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    extended = _run(curve, out, 6)
    assert len(steps) == 2 * 2
    for row in ("mtl", "ss-last"):
        assert list(extended[extended["row"] == row]["iteration"]) == [0, 2, 4, 6]
    columns = ["row", "iteration", "accuracy", "ci95", "diff_vs_mtl", "gain_vs_start"]
    before = first[first["iteration"] <= 4][columns].reset_index(drop=True)
    after = extended[extended["iteration"] <= 4][columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)

    # Other curve flags than the runs were made with are refused before any meta-step.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _run(curve, out, 6, "--lr-step", "7")
    assert exit_info.value.code == 2 and len(steps) == 4
    assert "Error: " in capsys.readouterr().err


def test_summary_of_a_hand_made_frame(curve):
    def point(row, iteration, accuracy, diff=math.nan, gain=0.0):
        return {
            "row": row,
            "shots": 1,
            "iteration": iteration,
            "accuracy": accuracy,
            "ci95": 1.0,
            "tasks": 600,
            "diff_vs_mtl": diff,
            "diff_vs_mtl_ci95": 1.0,
            "gain_vs_start": gain,
            "gain_vs_start_ci95": 0.5,
        }

    frame = pd.DataFrame(
        [
            point("mtl", 0, 50.0),
            point("mtl", 250, 55.0, gain=5.0),
            point("mtl", 500, 54.0, gain=4.0),
            point("ft-all", 0, 50.0, diff=0.0),
            point("ft-all", 250, 52.0, diff=-3.0, gain=2.0),
            point("ft-all", 500, 49.0, diff=-5.0, gain=-1.0),
            point("mtl-ht", 0, 50.0, diff=0.0),
            point("mtl-ht", 250, 55.5, diff=0.5, gain=5.5),
            point("mtl-ht", 500, 56.0, diff=2.0, gain=6.0),
            point("ss-last", 0, 50.0, diff=0.0),
            point("ss-last", 250, 54.8, diff=-0.2, gain=4.8),
            point("ss-last", 500, 54.5, diff=0.5, gain=4.5),
        ]
    )
    lines = curve.summary(frame)
    assert lines[1] == "1-shot:"
    text = "\n".join(lines)
    assert "  ss-last vs mtl: within the CI at every iteration (0, 250, 500)" in text
    assert "  ft-all vs mtl: below at 250 (-3.00 ± 1.00), 500 (-5.00 ± 1.00); within the CI at the other 1 of 3" in text
    assert "  mtl-ht vs mtl: above at 500 (+2.00 ± 1.00); within the CI at the other 2 of 3" in text
    # ss-last, ft-all, mtl-ht in this order, then each row's best point and its gain over iteration 0.
    assert text.index("ss-last vs") < text.index("ft-all vs") < text.index("mtl-ht vs")
    assert "  mtl: best 55.00 ± 1.00 % at iteration 250, +5.00 ± 0.50 over iteration 0 (50.00 %)" in text
    assert "  ft-all: best 52.00 ± 1.00 % at iteration 250, +2.00 ± 0.50 over iteration 0 (50.00 %)" in text
    assert "  mtl-ht: best 56.00 ± 1.00 % at iteration 500, +6.00 ± 0.50 over iteration 0 (50.00 %)" in text


def test_curve_frame_pairs_tasks(curve):
    per_task = pd.DataFrame(
        [
            {"row": row, "shots": 1, "iteration": it, "task": task, "accuracy": 50.0 + task + bump}
            for row, bump in (("mtl", 0.0), ("ft-all", -2.0))
            for it in (0, 2)
            for task in range(4)
        ]
    )
    per_task.loc[(per_task["row"] == "mtl") & (per_task["iteration"] == 2), "accuracy"] += 3.0
    frame = curve.curve_frame(per_task).set_index(["row", "iteration"])
    assert frame.loc[("mtl", 2), "gain_vs_start"] == 3.0 and frame.loc[("mtl", 2), "gain_vs_start_ci95"] == 0.0
    assert frame.loc[("ft-all", 0), "diff_vs_mtl"] == -2.0 and frame.loc[("ft-all", 2), "diff_vs_mtl"] == -5.0
    assert list(frame.index.get_level_values("row")) == ["mtl", "mtl", "ft-all", "ft-all"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rows", "mtl,nope"], "unknown row 'nope'"),
        (["--rows", "protonet"], "unknown row 'protonet'"),
        (["--shots", "0"], "--shots"),
        (["--shots", "a"], "--shots"),
        (["--iterations", "100", "--val-every", "30"], "does not divide"),
        (["--iterations", "100", "--val-every", "200"], "--val-every 200"),
        (["--val-tasks", "1"], "--val-tasks 1"),
        (["--lr-step", "0"], "--lr-step 0"),
    ],
)
def test_bad_flags_exit_2_before_any_work(curve, data_home, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(curve, "get_benchmark", lambda *a, **k: pytest.fail("loaded data before checking the flags"))
    with pytest.raises(SystemExit) as exit_info:
        curve.main(["--out", str(data_home / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err


def test_an_autocast_curve_runs_apart_and_is_paired_with_float32(curve, data_home, capsys):
    out = data_home / "out"
    _run(curve, out, 2)
    capsys.readouterr()
    _run(curve, out, 2, "--autocast", "bf16")
    printed = capsys.readouterr().out
    assert (out / "budget-curve" / "mtl-1s-bf16" / "last.pt").is_file()
    assert (out / "budget-curve" / "budget-curve-bf16.csv").is_file()
    assert "bf16 against float32" in printed and "mtl 1-shot: 0: " in printed and "ss-last 1-shot: 0: " in printed
