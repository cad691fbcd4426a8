import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from benchmark_scripts import loaded_script
from click.testing import CliRunner

from mtl_plugin.bench import runner as bench_module
from mtl_plugin.bench.config import DEEP_PRETRAIN_EPOCHS
from mtl_plugin.bench.published import PUBLISHED, published_accuracy
from mtl_plugin.bench.runner import BenchConfig, run_bench
from mtl_plugin.cli import main
from mtl_plugin.errors import UsageError

# benchmarks/tiny_bench.py's tiny bench: each row's quick budget cut to a few episodes or
# meta-iterations, and its settings on 6 images a class (it draws 20, for its larger task sets).
_tiny_bench = next(loaded_script("tiny_bench.py"))
_tiny_budgets = _tiny_bench.tiny_budgets
TINY = dict(_tiny_bench.TINY, dataset_options={"num_classes": 30, "instances": 6})


@pytest.fixture()
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))
    return tmp_path


def test_bench_table_cells_and_files(data_home):
    config = BenchConfig.quick(methods=("protonet", "finetune", "cosine-finetune"), out=data_home / "out", **TINY)
    result = run_bench(config, echo=lambda line: None)
    table = result.table
    assert list(table["method"]) == ["protonet", "finetune", "cosine-finetune"]
    # The row that learns from the test queries says so.
    assert list(table["setting"]) == ["inductive", "inductive", "transductive"]
    assert set(table.columns) >= {"method", "backbone", "setting", "1-shot", "wall-clock (s)"}
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
    (cell_path,) = (data_home / "out" / "cells").glob("protonet-5w1s-*.json")
    cell = json.loads(cell_path.read_text())
    assert len(cell["accuracies"]) == 6

    real_build = bench_module.build_method

    def unfittable(name, profile):
        method = real_build(name, profile)  # built for its config, which keys the cell

        def no_fit(*args, **kwargs):
            raise AssertionError("a finished cell must be reused, not fitted again")

        method.fit = no_fit
        return method

    monkeypatch.setattr(bench_module, "build_method", unfittable)
    second = run_bench(config, echo=lambda line: None)
    assert first.table.equals(second.table)


def test_same_seed_gives_a_byte_identical_csv(data_home, monkeypatch):
    # Two fresh output folders: nothing is shared but the seed (the data cache is keyed by it too).
    monkeypatch.setattr(bench_module, "build_method", _tiny_budgets(bench_module.build_method))
    methods = ("protonet", "maml", "metanet", "protonet-conv4", "mtl", "mtl-ht")
    options = dict(TINY, dataset_options={"num_classes": 30, "instances": 20})
    csvs = []
    for name in ("first", "second"):
        config = BenchConfig.quick(methods=methods, out=data_home / name, **options)
        result = run_bench(config, echo=lambda line: None)
        csvs.append(result.files["csv"].read_bytes())
        assert "wall-clock" not in csvs[-1].decode()
        timings = result.files["timings"].read_text()
        assert timings.startswith("method,shots,fit_seconds,eval_seconds")
    assert csvs[0] == csvs[1]


SHARED = ("protonet", "maml", "protonet-conv4", "mtl")


def _bench_rank(rank: int, world: int, port: int, home: str) -> None:
    """One process of a torchrun-like job (the variables torchrun sets) running the bench of SHARED."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MTL_DATA=str(Path(home) / "data"),
    )
    torch.set_num_threads(1)
    bench_module.build_method = _tiny_budgets(bench_module.build_method)
    lines: list[str] = []
    result = run_bench(BenchConfig.quick(methods=SHARED, out=Path(home) / "shared", **TINY), echo=lines.append)
    (Path(home) / f"rank{rank}.json").write_text(json.dumps({"lines": lines, "result": result is not None}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_processes_of_a_torchrun_job_share_the_cells_and_make_the_table_of_one(data_home, monkeypatch, one_thread):
    torch.multiprocessing.spawn(_bench_rank, args=(2, _free_port(), str(data_home)), nprocs=2, join=True)
    ranks = [json.loads((data_home / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["result"] for rank in ranks] == [True, False]  # rank 0 alone writes the table
    # Every cell computed exactly once, by one rank or the other.
    done = sorted(line.split("] ")[1].split(":")[0] for rank in ranks for line in rank["lines"] if line.startswith("["))
    assert done == sorted(f"{method} 5-way 1-shot" for method in SHARED)
    # Each process computes a cell as one process alone does: the table of one process, byte for byte.
    monkeypatch.setattr(bench_module, "build_method", _tiny_budgets(bench_module.build_method))
    alone = run_bench(BenchConfig.quick(methods=SHARED, out=data_home / "alone", **TINY), echo=lambda line: None)
    shared = data_home / "shared" / alone.files["csv"].name
    assert shared.read_bytes() == alone.files["csv"].read_bytes()


def test_other_settings_neither_reuse_nor_overwrite_cells(data_home):
    out = data_home / "out"
    seed0 = run_bench(BenchConfig.quick(methods=("protonet",), out=out, **TINY), echo=lambda line: None)
    seed1 = run_bench(BenchConfig.quick(methods=("protonet",), out=out, seed=1, **TINY), echo=lambda line: None)
    cells = sorted((out / "cells").glob("protonet-5w1s-*.json"))
    assert len(cells) == 2
    assert len(list((out / "pretrain").iterdir())) == 2
    assert seed0.cells["accuracy"].iloc[0] != seed1.cells["accuracy"].iloc[0]


def test_new_images_under_the_same_settings_are_not_served_old_results(data_home, monkeypatch):
    # A new kanji generator gives other images for the same settings: the checksum of the
    # images keys the pretraining and the cells, so nothing cached for the old ones is reused.
    out = data_home / "out"
    config = BenchConfig.quick(methods=("protonet",), out=out, **TINY)
    run_bench(config, echo=lambda line: None)
    real_get_benchmark = bench_module.get_benchmark

    def regenerated(*args, **kwargs):
        return replace(real_get_benchmark(*args, **kwargs), content="images of a newer generator")

    monkeypatch.setattr(bench_module, "get_benchmark", regenerated)
    run_bench(config, echo=lambda line: None)
    assert len(list((out / "cells").glob("protonet-5w1s-*.json"))) == 2
    assert len(list((out / "pretrain").iterdir())) == 2


def test_a_method_whose_settings_changed_is_not_served_its_old_cell(data_home, monkeypatch):
    # A new version that changes a row's budget or settings: its old cells and work folders are stale.
    out = data_home / "out"
    config = BenchConfig.quick(methods=("protonet-conv4",), out=out, **TINY)
    monkeypatch.setattr(bench_module, "build_method", _tiny_budgets(bench_module.build_method))
    run_bench(config, echo=lambda line: None)
    tiny = bench_module.build_method

    def other_lr(name, profile):
        method = tiny(name, profile)
        method.config.lr /= 2
        return method

    monkeypatch.setattr(bench_module, "build_method", other_lr)
    run_bench(config, echo=lambda line: None)
    assert len(list((out / "cells").glob("protonet-conv4-5w1s-*.json"))) == 2
    assert len(list((out / "work" / "protonet-conv4").iterdir())) == 2


def test_a_row_that_averages_fits_reports_the_per_task_mean_of_fits_with_their_own_seeds(data_home, monkeypatch):
    # A row whose config says `fits=3` (metanet's quick profile: 8) is fitted three times and
    # evaluated on the same test tasks.
    tiny = _tiny_budgets(bench_module.build_method)
    contexts = []

    def recording(name, profile):
        method = tiny(name, profile)
        method.config = replace(method.config, fits=3)
        fit = method.fit

        def fit_and_record(context):
            contexts.append(context)
            fit(context)

        method.fit = fit_and_record
        return method

    monkeypatch.setattr(bench_module, "build_method", recording)
    out = data_home / "out"
    result = run_bench(BenchConfig.quick(methods=("metanet",), out=out, **TINY), echo=lambda line: None)
    assert [c.seed for c in contexts] == [0, 100_003, 200_006]
    first = contexts[0].work_dir
    assert [c.work_dir for c in contexts] == [
        first,
        first.with_name(f"{first.name}-fit2"),
        first.with_name(f"{first.name}-fit3"),
    ]
    assert all(c.work_dir.is_dir() for c in contexts)
    (cell_path,) = (out / "cells").glob("metanet-5w1s-*.json")
    cell = json.loads(cell_path.read_text())
    assert cell["fits"] == 3 and len(cell["fit_accuracies"]) == 3 and len(cell["accuracies"]) == 6
    # The mean of per-task means is the mean of the fits' means (same tasks), up to float rounding.
    assert cell["accuracy"] == pytest.approx(sum(cell["fit_accuracies"]) / 3, rel=1e-12)
    assert result.table["1-shot"].iloc[0].endswith("(n=6, 3 fits)")
    note = result.files["md"].read_text()
    each = ", ".join(f"{a:.2f}" for a in cell["fit_accuracies"])
    assert f"metanet: the mean of 3 fits on the same tasks; each fit: 1-shot {each}" in note
    # A finished cell is read back, not fitted again.
    contexts.clear()
    again = run_bench(BenchConfig.quick(methods=("metanet",), out=out, **TINY), echo=lambda line: None)
    assert contexts == [] and again.table.equals(result.table)
    # Asking for more fits trains only the new one: the first three are reused as they are.
    checkpoints = {path: (path / "checkpoint.pt").read_bytes() for path in (first, *first.parent.glob("*-fit*"))}

    def four_fits(name, profile):
        method = recording(name, profile)
        method.config = replace(method.config, fits=4)
        return method

    monkeypatch.setattr(bench_module, "build_method", four_fits)
    more = run_bench(BenchConfig.quick(methods=("metanet",), out=out, **TINY), echo=lambda line: None)
    assert [c.work_dir for c in contexts] == [*sorted(checkpoints), first.with_name(f"{first.name}-fit4")]
    assert {path: (path / "checkpoint.pt").read_bytes() for path in checkpoints} == checkpoints
    (four,) = (path for path in (out / "cells").glob("metanet-5w1s-*.json") if path != cell_path)
    assert json.loads(four.read_text())["fit_accuracies"][:3] == cell["fit_accuracies"]
    assert more.table["1-shot"].iloc[0].endswith("(n=6, 4 fits)")


def test_a_row_asking_for_no_fit_is_refused_before_the_shared_pretraining(data_home, monkeypatch):
    real_build = bench_module.build_method

    def no_fits(name, profile):
        method = real_build(name, profile)
        if name == "metanet":
            method.config = replace(method.config, fits=0)
        return method

    monkeypatch.setattr(bench_module, "build_method", no_fits)
    monkeypatch.setattr(bench_module, "pretrain", lambda *a, **k: pytest.fail("pretrained before checking fits"))
    config = BenchConfig.quick(methods=("protonet", "metanet"), out=data_home / "out", **TINY)
    with pytest.raises(ValueError, match=r"MetaNetConfig\(fits=0\): a cell averages 1 or more fits"):
        run_bench(config, echo=lambda line: None)


def test_a_corrupt_cell_is_recomputed(data_home):
    config = BenchConfig.quick(methods=("protonet",), out=data_home / "out", **TINY)
    first = run_bench(config, echo=lambda line: None)
    (cell_path,) = (data_home / "out" / "cells").glob("protonet-5w1s-*.json")
    results = first.files["csv"].read_bytes()
    cell_path.write_text('{"key": {"trunc')
    second = run_bench(config, echo=lambda line: None)
    assert second.files["csv"].read_bytes() == results
    assert json.loads(cell_path.read_text())["tasks"] == 6


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


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(queries=50), "51"),
        (dict(backbone="resnet999"), "resnet999"),
        (dict(ways=31), "31"),
    ],
)
def test_bad_settings_fail_before_the_shared_pretraining(data_home, monkeypatch, change, message):
    def no_pretraining(*args, **kwargs):
        raise AssertionError("the settings must be checked before pretraining")

    monkeypatch.setattr(bench_module, "pretrain", no_pretraining)
    config = BenchConfig.quick(methods=("protonet",), out=data_home / "out", **{**TINY, **change})
    with pytest.raises(ValueError, match=message):
        run_bench(config, echo=lambda line: None)


def test_an_unwritable_output_folder_fails_before_any_work(data_home, monkeypatch):
    monkeypatch.setattr(bench_module, "pretrain", lambda *a, **k: pytest.fail("pretrained before checking --out"))
    blocker = data_home / "a-file"
    blocker.write_text("")
    config = BenchConfig.quick(methods=("protonet",), out=blocker / "out", **TINY)
    with pytest.raises(UsageError, match="cannot write there"):
        run_bench(config, echo=lambda line: None)


def test_ablation_suite_counts_claims_plot_and_reuses_comparison_cells(data_home, monkeypatch):
    tiny = _tiny_budgets(bench_module.build_method)
    monkeypatch.setattr(bench_module, "build_method", tiny)
    out = data_home / "out"
    comparison = run_bench(BenchConfig.quick(methods=("mtl",), out=out, **TINY), echo=lambda line: None)
    fitted, lines = [], []

    def recording(name, profile):
        method = tiny(name, profile)
        fit = method.fit

        def recorded_fit(context):
            fitted.append(name)
            return fit(context)

        method.fit = recorded_fit
        return method

    monkeypatch.setattr(bench_module, "build_method", recording)
    config = BenchConfig.quick(suite="ablation", methods=("ft-head", "ft-all", "mtl"), out=out, **TINY)
    result = run_bench(config, echo=lines.append)
    assert fitted == ["ft-head", "ft-all"]  # mtl's cell is the comparison suite's, reused
    table = result.table
    assert list(table.columns[:5]) == ["method", "adapts", "backbone", "setting", "learned parameters"]
    assert list(table["adapts"]) == ["FT [θ]", "FT [Θ; θ]", "SS [Θ; θ]"]
    counts = dict(zip(table["method"], table["learned parameters"]))
    assert counts["ft-head"] == 64 < counts["mtl"] < counts["ft-all"]  # Conv4 at 28 px: 64-d features
    claims = pd.read_csv(result.files["claims"])
    assert {
        "SS beats FT on every layer",
        "meta-learning SS beats meta-learning the head alone",
        "ft-all vs mtl",
    } <= set(claims["claim"])
    assert set(claims["verdict"]) <= {"holds", "reversed", "within CI"}
    assert result.files["parameters"].stat().st_size > 0
    assert "Closing note" in result.files["md"].read_text() and any("Closing note" in line for line in lines)
    # Both suites write into one --out side by side.
    assert result.files["csv"] != comparison.files["csv"] and comparison.files["csv"].exists()


def test_comparison_checks_the_papers_claims_on_the_rows_it_ran(data_home, monkeypatch):
    monkeypatch.setattr(bench_module, "build_method", _tiny_budgets(bench_module.build_method))
    config = BenchConfig.quick(methods=("protonet", "linear-probe", "mtl"), out=data_home / "out", **TINY)
    result = run_bench(config, echo=lambda line: None)
    claims = pd.read_csv(result.files["claims"])
    assert list(claims["claim"][:2]) == [
        "meta-transfer beats nearest-class-mean on its own embedding",
        "meta-transfer beats a linear probe on its own embedding (RFS-simple)",
    ]
    # Claims about rows that did not run (finetune, scratch, ...) are left out, not reported empty.
    assert not claims["claim"].str.contains("fine-tuning|scratch|MAML").any()
    assert set(claims["verdict"]) <= {"holds", "reversed", "within CI"}
    assert "Closing note" in result.files["md"].read_text()


def test_suite_option():
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "--profile", "quick", "--suite", "nope"])
    assert result.exit_code == 2 and "'nope'" in result.output
    assert published_accuracy("mini-imagenet", "ft-head", 5, 1).accuracy == 55.9
    assert published_accuracy("fc100", "ft-head", 5, 10).accuracy == 61.6


def test_deep_profile_runs_its_suite_on_resnet12_half_with_counts_and_claims(data_home, monkeypatch):
    monkeypatch.setattr(bench_module, "build_method", _tiny_budgets(bench_module.build_method))
    # 30 steps at lr 0.01, not 2 at 0.1: those left ResNet-12's features (frozen BatchNorm on
    # barely started running statistics) far above a trained scale, and the inner loop diverged.
    pretrain = replace(TINY["pretrain"], backbone="resnet12-half", epochs=5, steps_per_epoch=6, lr=0.01)
    config = BenchConfig.deep(out=data_home / "out", **{**TINY, "backbone": "resnet12-half", "pretrain": pretrain})
    assert config.rows == bench_module.SUITES["deep"] and config.profile == "deep"
    result = run_bench(config, echo=lambda line: None)
    table = result.table
    assert list(table["method"]) == list(bench_module.SUITES["deep"])
    assert set(table["backbone"]) >= {"resnet12-half"}
    counts = dict(zip(table["method"], table["learned parameters"]))
    assert counts["ft-head"] < counts["ss-last"] < counts["mtl"] < counts["ft-all"]
    claims = set(pd.read_csv(result.files["claims"])["claim"])
    assert {
        "SS beats FT on every layer",
        "meta-transfer beats fine-tuning the pretrained model",
        "meta-transfer beats a linear probe on its own embedding (RFS-simple)",
        "the hard-task meta-batch helps (resample)",
    } <= claims
    assert result.files["csv"].name == "kanji-5way-deep.csv" and result.files["parameters"].stat().st_size > 0


def test_deep_profile_settings():
    config = BenchConfig.deep()
    assert (config.backbone, config.image_size, config.test_tasks) == ("resnet12-half", 28, 300)
    pretraining = bench_module.pretrain_config_for(config)
    assert pretraining.backbone == "resnet12-half" and pretraining.epochs == DEEP_PRETRAIN_EPOCHS
    # The quick profile's warmup was chosen on Conv4; the deep run keeps its record (and so its
    # folder's digest and its table) as measured without one.
    assert "warmup_share" not in pretraining.record()
    assert bench_module.pretrain_config_for(BenchConfig.quick()).warmup_share == 0.1
    # A row without a deep() of its own takes its quick budget.
    assert (
        bench_module.build_method("protonet-conv4", "deep").config
        == bench_module.build_method("protonet-conv4", "quick").config
    )
    assert bench_module.bench_config_from("deep", test_tasks=10).backbone == "resnet12-half"
    # Its own deep(): fine-tuning every pretrained weight; a subclass (cosine-finetune) keeps its quick settings.
    assert bench_module.build_method("finetune", "deep").config.train_backbone
    assert (
        bench_module.build_method("cosine-finetune", "deep").config
        == bench_module.build_method("cosine-finetune", "quick").config
    )


def test_the_closing_note_names_a_shared_pretraining_that_did_not_learn(data_home, monkeypatch):
    # TINY's pretraining (two steps) ends at chance level's loss: the rows on it are named.
    monkeypatch.setattr(bench_module, "build_method", _tiny_budgets(bench_module.build_method))
    lines = []
    config = BenchConfig.quick(methods=("protonet", "protonet-conv4"), out=data_home / "out", **TINY)
    result = run_bench(config, lines.append)
    warning = "Warning: the shared pretraining of protonet: pretraining is not learning"
    assert warning in result.files["md"].read_text() and any(line.startswith(warning) for line in lines)


def test_the_bench_runs_on_a_data_set_the_user_registered(data_home, monkeypatch):
    from mtl_plugin import ImageRecipe, dataset_spec, register_dataset
    from mtl_plugin.data import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_dataset("my-kanji", recipe=ImageRecipe(native_size=28, channels=1), options=("num_classes", "instances"))
    def my_kanji(root, *, image_size, data_seed, **options):
        return dataset_spec("kanji").load(root, image_size=image_size, data_seed=data_seed, **options)

    config = BenchConfig.quick(methods=("protonet",), out=data_home / "out", **{**TINY, "dataset": "my-kanji"})
    result = run_bench(config, echo=lambda line: None)
    assert list(result.table["method"]) == ["protonet"]
    assert result.files["csv"].name.startswith("my-kanji-5way")
    assert (data_home / "data" / "my-kanji").is_dir()


def test_a_cosine_head_pretraining_feeds_every_pretrained_row(data_home):
    from mtl_plugin.heads import CosineClassifier

    rows = ("protonet", "finetune", "cosine-finetune", "linear-probe", "mtl")
    pretrain = replace(TINY["pretrain"], head="cosine")
    config = BenchConfig.quick(methods=rows, out=data_home / "out", **{**TINY, "pretrain": pretrain})
    result = run_bench(config, echo=lambda line: None)
    assert list(result.table["method"]) == list(rows)
    (last,) = (data_home / "out" / "pretrain").glob("*/last.pt")
    state = torch.load(last, weights_only=True)
    assert state["config"]["head"] == "cosine"
    assert set(state["classifier"]) >= {"1.weight", "1.scale"}
    assert isinstance(CosineClassifier(4, 3)(torch.randn(2, 4)), torch.Tensor)
