"""benchmarks/float_spread.py: how far a row trained from scratch moves when its floats change."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from benchmark_scripts import loaded_script
from tiny_data import TinyBenchmark, pattern_split

from mtl_plugin.tasks import build_taskset

pytestmark = pytest.mark.usefixtures("one_thread")

WAYS, SHOTS, QUERIES, SIZE = 3, 1, 2, 16


@pytest.fixture(scope="module")
def spread():
    yield from loaded_script("float_spread.py")


@pytest.fixture(scope="module")
def benchmark() -> TinyBenchmark:
    splits = {
        name: pattern_split(4, SHOTS + QUERIES + 1, SIZE, seed=k, noise=0.5)
        for k, name in enumerate(["train", "val", "test"])
    }
    return TinyBenchmark(**splits, image_size=SIZE)


def test_a_shifted_split_gives_the_same_tasks_on_images_moved_by_the_shift(spread, benchmark):
    moved = spread.shifted(benchmark.val, 1e-3)
    assert moved.labels_to_indices == benchmark.val.labels_to_indices
    x, y = build_taskset(benchmark.val, WAYS, SHOTS, QUERIES, seed=5).sample()
    moved_x, moved_y = build_taskset(moved, WAYS, SHOTS, QUERIES, seed=5).sample()
    assert torch.equal(y, moved_y)
    torch.testing.assert_close(moved_x - x, torch.full_like(x, 1e-3), rtol=0, atol=1e-6)
    assert spread.shifted(benchmark.val, 0.0) is benchmark.val


def test_the_spread_is_largest_minus_smallest_against_the_widest_ci(spread):
    runs = pd.DataFrame(
        {
            "method": ["maml"] * 3 + ["tadam"] * 2,
            "shots": [1] * 5,
            "accuracy": [40.0, 41.5, 40.5, 50.0, 52.0],
            "ci95": [1.2, 1.0, 1.1, 1.0, 1.1],
        }
    )
    table = spread.spread_table(runs)
    assert table["spread"].tolist() == [1.5, 2.0]
    assert table["ci95"].tolist() == [1.2, 1.1]
    assert table["within CI"].tolist() == [False, False]
    assert spread.spread_table(runs.assign(ci95=2.0))["within CI"].tolist() == [True, True]
    # The standard deviation between runs (n - 1), and the chance it gives two fits to differ by more than the CI.
    assert table["sd"].tolist() == [0.76, 1.41]
    assert table["P(two fits differ > CI)"].tolist() == [round(spread.beyond_ci(0.7637626, 1.2), 2), 0.58]
    # Runs without a training loss (results kept before it was recorded) show "-".
    assert table["tail losses"].tolist() == ["- - -", "- -"]
    losses = spread.spread_table(runs.assign(tail_loss=[0.9, 0.8, None, 1.25, 1.0]))["tail losses"]
    assert losses.tolist() == ["0.900 0.800 -", "1.250 1.000"]


def test_two_fits_differ_beyond_the_ci_as_often_as_a_normal_difference_does(spread):
    # The difference of two fits has standard deviation sd * sqrt(2): beyond 1.96 of those 5 % of the time.
    assert spread.beyond_ci(0.5, 1.96 * 0.5 * 2**0.5) == pytest.approx(0.05, rel=1e-3)
    assert spread.beyond_ci(0.5, 0.0) == 1.0
    assert spread.beyond_ci(0.0, 1.0) == 0.0


def test_a_fit_is_kept_with_its_result_and_a_rerun_only_reads_it(spread, benchmark, tmp_path, monkeypatch):
    settings = {"max_episodes": 3, "checkpoint_every": 3, "train_queries": QUERIES}
    kwargs = dict(work_dir=tmp_path, split="val", tasks=4, ways=WAYS, queries=QUERIES, seed=0, settings=settings)
    first = spread.fit_and_validate("protonet-conv4", SHOTS, 1e-6, benchmark, **kwargs)
    assert first["tail_loss"] > 0  # the mean of its last quarter of episodes' losses (here one of three)
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("protonet-conv4-1shot-shift1e-06-")
    assert json.loads(next(folder.glob("val-*.json")).read_text()) == first
    monkeypatch.setattr(spread, "evaluate", lambda *a, **k: pytest.fail("evaluated a finished fit again"))
    assert spread.fit_and_validate("protonet-conv4", SHOTS, 1e-6, benchmark, **kwargs) == first


def test_a_run_of_a_row_that_averages_fits_is_the_mean_its_bench_cell_holds(spread, benchmark, tmp_path):
    settings = {"max_episodes": 3, "checkpoint_every": 3, "train_queries": QUERIES, "fits": 2}
    kwargs = dict(work_dir=tmp_path, split="val", tasks=4, ways=WAYS, queries=QUERIES, seed=0, settings=settings)
    run = spread.fit_and_validate("metanet", SHOTS, 0.0, benchmark, **kwargs)
    assert len(run["fit_accuracies"]) == 2
    assert run["accuracy"] == pytest.approx(sum(run["fit_accuracies"]) / 2, rel=1e-12)
    # Each fit in its own folder, named as the bench names them.
    first, second = sorted(tmp_path.iterdir())
    assert second.name == f"{first.name}-fit2" and any(second.iterdir())
    # A run that asks for three fits trains only the third, beside the first two.
    more = spread.fit_and_validate("metanet", SHOTS, 0.0, benchmark, **{**kwargs, "settings": {**settings, "fits": 3}})
    assert more["fit_accuracies"][:2] == run["fit_accuracies"] and len(more["fit_accuracies"]) == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == [first.name, second.name, f"{first.name}-fit3"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "protonet"], "--methods protonet: not a row trained from scratch"),
        (["--set", "max_episodes"], "--set max_episodes: give FIELD=VALUE"),
        (["--set", "lr=fast"], "--set lr=fast: give FIELD=VALUE"),
        (["--methods", "maml", "--set", "nosuch=1"], "maml's config has no such field"),
    ],
)
def test_bad_flags_exit_2_before_any_work(spread, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(spread, "get_benchmark", lambda *a, **k: pytest.fail("loaded data before checking the flags"))
    with pytest.raises(SystemExit) as exit_info:
        spread.main(flags, standalone_mode=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and len(err.splitlines()) == 1
