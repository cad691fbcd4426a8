"""The learn2learn-shaped examples run with MTL (and hard tasks) dropped in, learn, and take few changed lines."""

import functools
import inspect
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

import mtl_plugin
from mtl_plugin import PretrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# 5-shot tasks on 24 training classes: a few steps of pretraining already give features far above chance.
DATA = {"num_classes": 40, "instances": 16}
PRETRAINING = PretrainConfig("conv4", epochs=10, batch_size=32, val_tasks=10)
# The most lines a learn2learn user changes in their script: for SS, and for the hard-task meta-batch.
MOST = {"MTL": 8, "HT": 4}


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))


def shrunk(name: str, monkeypatch, tmp_path):
    """An example's ``main`` on tiny kanji with a short pretraining: its data and pretraining lines
    as a user would shrink them (the same size in both, so the classes stay those the tasks use)."""
    main = runpy.run_path(str(EXAMPLES / name))["main"]
    monkeypatch.chdir(tmp_path)
    main.__globals__["get_benchmark"] = functools.partial(mtl_plugin.get_benchmark, **DATA)
    main.__globals__["PretrainConfig"] = SimpleNamespace(quick=lambda: PRETRAINING)
    monkeypatch.setattr(mtl_plugin, "get_tasksets", functools.partial(mtl_plugin.get_tasksets, **DATA))
    return main


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_maml_with_ss_and_hard_tasks_beats_chance(tmp_path, monkeypatch, hard_tasks):
    main = shrunk("maml_kanji.py", monkeypatch, tmp_path)
    accuracy = main(shots=5, meta_batch_size=4, num_iterations=3, test_tasks=40, hard_tasks=hard_tasks, cuda=False)
    assert accuracy > 0.3  # 5-way chance: 0.2


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_protonet_with_ss_and_hard_tasks_beats_chance(tmp_path, monkeypatch, hard_tasks):
    main = shrunk("protonet_kanji.py", monkeypatch, tmp_path)
    accuracy = main(
        max_epoch=1,
        episodes=3,
        shot=5,
        train_query=5,
        test_shot=5,
        test_query=5,
        valid_tasks=5,
        test_tasks=40,
        hard_tasks=hard_tasks,
        cuda=False,
    )
    assert accuracy > 0.3


def test_a_users_own_loop_and_optimiser_drive_the_learner_and_beat_chance(tmp_path):
    main = runpy.run_path(str(EXAMPLES / "own_loop.py"))["main"]
    accuracy = main(
        shots=5,
        meta_batch_size=2,
        num_iterations=3,
        test_tasks=40,
        pretrain_dir=str(tmp_path / "pre"),
        data=DATA,
        cuda=False,
        pretraining=PRETRAINING,
    )
    assert accuracy > 0.3  # 5-way chance: 0.2


def marked(lines, mark):
    return sum(line.rstrip().endswith(f"# {mark}") or f"  # {mark}:" in line for line in lines)


@pytest.mark.parametrize("name", ["maml_kanji.py", "protonet_kanji.py"])
def test_the_plugin_takes_few_marked_lines_and_the_docstring_counts_them(name):
    source = (EXAMPLES / name).read_text()
    for mark, most in MOST.items():
        count = marked(source.splitlines(), mark)
        assert 1 <= count <= most
        assert re.search(rf"``# {mark}`` \({count} lines", source), f"the docstring of {name} miscounts # {mark}"


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("maml_kanji.py", ["batch", "learner", "loss", "adaptation_steps", "shots", "ways", "device"]),
        ("protonet_kanji.py", ["model", "batch", "ways", "shot", "query_num", "metric", "device"]),
    ],
)
def test_fast_adapt_keeps_learn2learns_signature_and_the_loop_draws_one_task_at_a_time(name, parameters):
    source = (EXAMPLES / name).read_text()
    assert list(inspect.signature(runpy.run_path(str(EXAMPLES / name))["fast_adapt"]).parameters) == parameters
    assert re.search(r"batch = hard\.sample\(\) if hard_tasks else tasksets\.train\.sample\(\)  # HT", source)


def test_the_readme_shows_every_marked_line_of_the_maml_example():
    readme = (EXAMPLES.parent / "README.md").read_text()
    for line in (EXAMPLES / "maml_kanji.py").read_text().splitlines():
        if marked([line], "MTL") or marked([line], "HT"):
            assert line.strip() in readme, f"README: {line.strip()}"
