"""benchmarks/pretrain_recipes.py: every recipe and the episodic row on tiny data, and the pick."""

from __future__ import annotations

import pandas as pd
import pytest
from benchmark_scripts import loaded_script
from click.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipes():
    yield from loaded_script("pretrain_recipes.py")


def test_the_pick_is_the_recipe_whose_largest_shortfall_is_smallest(recipes):
    table = pd.DataFrame(
        [
            # linear wins kanji by 5 and loses harsh by 1; cosine the reverse: linear's worst case is better.
            {"data": "kanji", "recipe": "linear", "distance": "cosine", "shots": 1, "val": 70.0},
            {"data": "kanji", "recipe": "cosine", "distance": "cosine", "shots": 1, "val": 65.0},
            {"data": "harsh", "recipe": "linear", "distance": "cosine", "shots": 1, "val": 40.0},
            {"data": "harsh", "recipe": "cosine", "distance": "cosine", "shots": 1, "val": 41.0},
            {"data": "harsh", "recipe": "protonet-conv4", "distance": "cosine", "shots": 1, "val": 60.0},
        ]
    )
    shortfall = recipes.worst_shortfall(table)
    assert list(shortfall.index) == ["linear", "cosine"]
    assert shortfall.tolist() == pytest.approx([1.0, 5.0])


def test_a_warmup_is_a_share_of_the_budget_and_the_rest_is_the_quick_recipe_before_the_study(recipes):
    budget = recipes.PretrainConfig.quick(warmup_share=0.0)
    config = recipes._recipe(budget, "cosine-warmup")
    assert (config.head, config.warmup_share) == ("cosine", 0.1)
    assert recipes._recipe(budget, "linear") == budget
    # The study's pick is the quick pretraining now.
    assert recipes._recipe(budget, "linear-warmup") == recipes.PretrainConfig.quick()


def test_every_recipe_and_the_episodic_row_run_on_tiny_kanji_and_a_rerun_resumes(recipes, tmp_path):
    arguments = ["--out", str(tmp_path), "--data", "few", "--recipe", "linear", "--recipe", "cosine"]
    arguments += ["--epochs", "1", "--tasks", "4", "--classes", "40"]
    first = CliRunner().invoke(recipes.main, arguments)
    assert first.exit_code == 0, first.output
    table = pd.read_csv(tmp_path / "recipes.csv")
    assert sorted(set(table["recipe"])) == ["cosine", "linear", "protonet-conv4"]
    assert sorted(set(table["shots"])) == [1, 5] and sorted(set(table["distance"])) == ["cosine", "squared_euclidean"]
    pretrained = table[table["recipe"] != "protonet-conv4"]
    assert pretrained["loss_share_of_chance"].notna().all()
    second = CliRunner().invoke(recipes.main, arguments)
    assert second.exit_code == 0, second.output
    again = pd.read_csv(tmp_path / "recipes.csv")
    # Resumed runs read the same weights back: the same scores.
    pd.testing.assert_series_equal(again["val"], table["val"])
