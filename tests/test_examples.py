"""The learn2learn-shaped examples run with MTL (and hard tasks) dropped in, and learn."""
import runpy
from pathlib import Path

import pytest

from mtl_plugin import PretrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# 5-shot tasks on 24 training classes: a few steps of pretraining already give features far above chance.
TINY = dict(data={"num_classes": 40, "instances": 16}, shots=5, test_tasks=40, device="cpu",
            pretraining=PretrainConfig("conv4", epochs=10, batch_size=32, val_tasks=10))


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "data"))


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_maml_with_ss_and_hard_tasks_beats_chance(tmp_path, hard_tasks):
    main = runpy.run_path(str(EXAMPLES / "maml_kanji.py"))["main"]
    accuracy = main(meta_batch_size=4, iterations=3, hard_tasks=hard_tasks, out=str(tmp_path / "pre"), **TINY)
    assert accuracy > 0.3  # 5-way chance: 0.2


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_protonet_with_ss_and_hard_tasks_beats_chance(tmp_path, hard_tasks):
    main = runpy.run_path(str(EXAMPLES / "protonet_kanji.py"))["main"]
    accuracy = main(queries=5, iterations=3, hard_tasks=hard_tasks, out=str(tmp_path / "pre"), **TINY)
    assert accuracy > 0.3


@pytest.mark.parametrize("name", ["maml_kanji.py", "protonet_kanji.py"])
def test_the_plugin_takes_few_marked_lines(name):
    lines = (EXAMPLES / name).read_text().splitlines()
    assert sum(line.rstrip().endswith("# MTL") or "  # MTL:" in line for line in lines) <= 7
    assert sum(line.rstrip().endswith("# HT") or "  # HT:" in line for line in lines) <= 4
