"""No val or test class in training: one class split per data set whatever the task seed, and a
leak guard at every stage that reads a trained model (issue 44)."""

import dataclasses
import runpy
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_data_formats import WRITERS
from test_examples import DATA, EXAMPLES, shrunk
from test_reliability import TINY_KANJI, data_home, tiny_kanji  # noqa: F401  (--data kanji: 18 / 6 / 6 classes)

import mtl_plugin
from mtl_plugin import PretrainConfig, get_benchmark, get_tasksets, pretrain
from mtl_plugin.cli import main
from mtl_plugin.data.images import ArraySource, ImageClassDataset, as_meta_dataset
from mtl_plugin.data.leak import ClassLeakError, class_record, seen_classes
from mtl_plugin.errors import UsageError
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.ss import SSAdapter
from mtl_plugin.training.checkpoints import load_learner
from mtl_plugin.training.meta_training import meta_train
from mtl_plugin.training.pretrain_checkpoint import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = PretrainConfig("conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2, val_ways=3, val_queries=2)


def _kanji(**options):
    return get_benchmark("kanji", progress=False, **TINY_KANJI, **options)


@pytest.fixture(scope="module")
def leaked(tmp_path_factory, data_home):
    """A pretraining whose training classes are tiny kanji's test classes."""
    out = tmp_path_factory.mktemp("leaked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTL_DATA", str(data_home))
        bench = _kanji()
        on_test = dataclasses.replace(bench, train=bench.test, train_augmented=bench.test)
        pretrain(on_test, CONFIG, out, progress=False)
    return out / "best.pt"


def _mtl(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(result, split: str) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"of the 6 {split} classes" in errors[0], result.output
    return errors[0]


def _classes(split) -> set[str]:
    return set(split.dataset.class_names)


def test_the_task_seed_draws_tasks_and_never_the_classes():
    one = get_tasksets("kanji", train_samples=2, test_samples=2, seed=1, **TINY_KANJI)
    other = get_tasksets("kanji", train_samples=2, test_samples=2, seed=42, **TINY_KANJI)
    bench = _kanji()
    for mine, theirs, split in zip(one, other, (bench.train, bench.val, bench.test)):
        assert _classes(mine.dataset) == _classes(theirs.dataset) == _classes(split)
    assert not torch.equal(one.train.sample()[0], other.train.sample()[0])


def test_get_benchmark_takes_a_data_seed_and_refuses_a_task_seed():
    with pytest.raises(UsageError, match="data_seed="):
        get_benchmark("kanji", seed=42, progress=False, **TINY_KANJI)
    assert _kanji(data_seed=1).settings["seed"] == 1


@pytest.mark.parametrize("name", ["maml_kanji.py", "protonet_kanji.py", "own_loop.py"])
def test_the_examples_pretrain_on_none_of_the_classes_they_test_on(name, monkeypatch, tmp_path):
    # The drop-ins as a user shrinks them (test_examples.shrunk); own_loop takes its data size.
    main = (
        shrunk(name, monkeypatch, tmp_path) if name != "own_loop.py" else runpy.run_path(str(EXAMPLES / name))["main"]
    )
    seen, tasksets = {}, mtl_plugin.get_tasksets

    def recorded(*args, **kwargs):
        seen["tasksets"] = tasksets(*args, **kwargs)
        return seen["tasksets"]

    class Stop(Exception):
        pass

    def pretraining(benchmark, *args, **kwargs):
        seen["pretrained"] = class_record(benchmark.train, benchmark.name)
        raise Stop

    monkeypatch.setattr(mtl_plugin, "get_tasksets", recorded)
    main.__globals__["pretrain"] = pretraining
    with pytest.raises(Stop):
        main(cuda=False, **({"data": DATA} if name == "own_loop.py" else {}))
    evaluated = dataclasses.make_dataclass("Evaluated", ["name", "val", "test"])(
        "kanji", seen["tasksets"].validation.dataset, seen["tasksets"].test.dataset
    )
    assert seen_classes(seen["pretrained"], evaluated) == {"val": 0, "test": 0}


def test_a_class_is_known_by_its_images_and_where_names_are_identities_by_its_name():
    pixels = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)

    def split(pixels, names):
        return as_meta_dataset(ImageClassDataset(ArraySource(pixels), [0, 0, 1, 1], names))

    renamed = dataclasses.make_dataclass("Data", ["name", "val", "test"])
    same_images = split(pixels, ["x", "y"])
    record = class_record(split(pixels, ["a", "b"]), "folder")
    assert seen_classes(record, renamed("folder", same_images, same_images)) == {"val": 2, "test": 2}
    redrawn = split(pixels + 1, ["a", "c"])  # other images: "a" is known by name alone
    assert (
        seen_classes(class_record(split(pixels, ["a", "b"]), "kanji"), renamed("kanji", redrawn, redrawn))["test"] == 1
    )
    assert seen_classes(record, renamed("folder", redrawn, redrawn))["test"] == 0


def test_meta_train_and_evaluate_refuse_a_pretraining_on_test_classes(leaked, tmp_path):
    shape = ["--ways", "3", "--shots", "1", "--queries", "2", "--iterations", "1"]
    _refused(_mtl("meta-train", "--pretrained", leaked, *shape, "--out", tmp_path / "m"), "test")
    assert not (tmp_path / "m").exists()
    error = _refused(_mtl("evaluate", "--checkpoint", leaked, "--tasks", "2", "--ways", "3", "--queries", "2"), "test")
    assert f"--checkpoint {leaked}" in error


def test_the_library_refuses_a_leaking_checkpoint_unless_told_it_is_a_transfer_study(leaked, tmp_path):
    bench = _kanji()
    with pytest.raises(ClassLeakError, match="6 of the 6 test classes"):
        load_pretrained(leaked, benchmark=bench)
    backbone = load_pretrained(leaked, benchmark=bench, allow_seen_classes=True)
    trained = torch.load(leaked, weights_only=True)["classes"]
    config = MetaTrainConfig(ways=3, shots=1, queries=2, iterations=1, val_every=1, val_tasks=2, checkpoint_every=1)
    learner = MetaTransferLearner(SSAdapter(backbone), ways=3, config=config)
    with pytest.raises(ClassLeakError, match="the learner was trained on 6 of the 6 test classes"):
        meta_train(learner, bench, tmp_path / "meta", progress=False, trained_classes=trained)
    assert not (tmp_path / "meta").exists()
    info = {
        "backbone": "conv4",
        "in_channels": 1,
        "image_size": 28,
        "encoder": "ss",
        **SSAdapter(backbone).config.to_dict(),
    }
    meta_train(
        learner,
        bench,
        tmp_path / "meta",
        progress=False,
        model_info=info,
        trained_classes=trained,
        allow_seen_classes=True,
    )
    best = tmp_path / "meta" / "best.pt"
    assert len(torch.load(best, weights_only=True)["classes"]["content"]) == 18 + 6
    with pytest.raises(ClassLeakError):
        load_learner(best, benchmark=bench)
    load_learner(best, benchmark=bench, allow_seen_classes=True)
    _refused(_mtl("evaluate", "--checkpoint", best, "--tasks", "2", "--ways", "3", "--queries", "2"), "test")


def test_a_checkpoint_from_before_the_record_is_read_with_one_warning(leaked, tmp_path):
    state = torch.load(leaked, weights_only=True)
    del state["classes"]
    old = tmp_path / "best.pt"
    torch.save(state, old)
    with pytest.warns(UserWarning, match="predates the record of its training classes"):
        load_pretrained(old, benchmark=_kanji())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(old)  # no data to check against: nothing to say


def test_the_bench_refuses_a_data_set_with_a_test_class_in_train(tmp_path):
    root = tmp_path / "data"
    WRITERS["folder"](root)
    shutil.copytree(root / "test" / "class_11", root / "train" / "copied")
    result = _mtl(
        "bench", "--profile", "quick", "--data", "folder", "--root", root, "--methods", "protonet",
        "--ways", "2", "--shots", "1", "--queries", "1", "--test-tasks", "2", "--out", tmp_path / "b",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Error: every row (the train split) was trained on 1 of the 5 test classes" in result.output
    assert not (tmp_path / "b" / "pretrain").exists()


def test_generating_a_data_set_says_what_how_long_and_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTL_DATA", str(tmp_path))
    get_benchmark("kanji", progress=False, num_classes=6, instances=2)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("kanji: generated 6 classes x 2 images at 28 px (data seed 0) in ")
    assert f"cached in {tmp_path}" in line
    get_benchmark("kanji", progress=False, num_classes=6, instances=2)
    assert "generated" not in capsys.readouterr().err


def test_the_quick_pretraining_takes_its_budget_as_arguments():
    assert PretrainConfig.quick(epochs=16).epochs == 16
    assert PretrainConfig.quick(steps_per_epoch=10).steps_per_epoch == 10
    assert PretrainConfig.quick() == dataclasses.replace(PretrainConfig.quick(epochs=16), epochs=40)
