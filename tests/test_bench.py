import json

import pytest
from click.testing import CliRunner

from mtl_plugin import bench as bench_module
from mtl_plugin.bench import BenchConfig, run_bench
from mtl_plugin.cli import main
from mtl_plugin.pretrain import PretrainConfig
from mtl_plugin.published import PUBLISHED, published_accuracy

TINY = dict(
    dataset="kanji",
    dataset_options={"num_classes": 30, "instances": 6},
    shots=(1,),
    queries=3,
    test_tasks=6,
    backbone="conv4",
    progress=False,
    pretrain=PretrainConfig(backbone="conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2,
                            val_queries=3),
)


@pytest.fixture()
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))
    return tmp_path


def test_bench_table_cells_and_files(data_home):
    config = BenchConfig.quick(methods=("protonet", "finetune"), out=data_home / "out", **TINY)
    result = run_bench(config, echo=lambda line: None)
    table = result.table
    assert list(table["method"]) == ["protonet", "finetune"]
    assert set(table.columns) >= {"method", "backbone", "1-shot", "wall-clock (s)"}
    # kanji is not a standard benchmark: no published column.
    assert not any(c.startswith("published") for c in table.columns)
    for cell in table["1-shot"]:
        assert cell.endswith("(n=6)") and " ± " in cell
    for path in result.files.values():
        assert path.exists() and path.stat().st_size > 0
    assert "1-shot" in result.files["md"].read_text()
    assert "\\begin{table}" in result.files["tex"].read_text() or "\\begin{tabular}" in result.files["tex"].read_text()


def test_methods_share_tasks_and_cells_resume(data_home, monkeypatch):
    config = BenchConfig.quick(methods=("protonet",), out=data_home / "out", **TINY)
    first = run_bench(config, echo=lambda line: None)
    cell = json.loads((data_home / "out" / "cells" / "protonet-5w1s.json").read_text())
    assert len(cell["accuracies"]) == 6

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished cell must be reused, not fitted again")

    monkeypatch.setattr(bench_module, "build_method", no_fit)
    second = run_bench(config, echo=lambda line: None)
    assert first.table.equals(second.table)


def test_bench_cli(data_home):
    out = data_home / "cli-out"
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--profile", "quick", "--methods", "nope", "--out", str(out)])
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output
    result = runner.invoke(main, ["bench", "--profile", "quick", "--shots", "1,x"])
    assert result.exit_code != 0 and "comma-separated" in result.output


def test_published_numbers_are_labelled_with_sources():
    assert published_accuracy("mini-imagenet", "mtl-ht", 5, 1).cell == "61.20 ± 1.80"
    assert published_accuracy("omniglot", "metanet", 5, 1).accuracy == 98.95
    assert published_accuracy("omniglot", "metanet", 20, 1).accuracy == 97.00
    assert published_accuracy("kanji", "mtl", 5, 1) is None
    assert all(row.source for row in PUBLISHED)


def test_bad_config():
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        BenchConfig(profile="fast")
    with pytest.raises(ValueError, match="test_tasks=1"):
        BenchConfig(test_tasks=1)
