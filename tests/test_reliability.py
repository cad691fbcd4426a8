"""Issue #11: every user mistake is one ``Error: ...`` line with exit code 2 (usage) or 1 (data),
no checkpoint runs code, and a diverging or repeated run never overwrites a good one.

Each test drives ``mtl`` through click's runner on a tiny kanji set (30 classes, 6 writers).
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import warnings
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_data import killed_at_write, raising_at_call

from mtl_plugin.cli import main
from mtl_plugin.cli import pipeline as pipeline_cli
from mtl_plugin.data import get_benchmark
from mtl_plugin.errors import DataError, MissingDataError, UsageError
from mtl_plugin.training.pretrain import PretrainConfig, pretrain
from mtl_plugin.utils.io import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_KANJI = dict(num_classes=30, instances=6)  # 18 / 6 / 6 classes
PRETRAIN = [
    "pretrain",
    "--backbone",
    "conv4",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--steps-per-epoch",
    "2",
    "--val-tasks",
    "2",
    "--val-ways",
    "3",
    "--val-queries",
    "2",
    "--device",
    "cpu",
    "--quiet",
]
EVALUATE = ["evaluate", "--ways", "3", "--queries", "2", "--tasks", "2", "--device", "cpu", "--quiet"]
# Two iterations, validated and checkpointed at the second.
META = [
    "meta-train",
    "--ways",
    "3",
    "--queries",
    "2",
    "--inner-steps",
    "2",
    "--iterations",
    "2",
    "--val-every",
    "2",
    "--val-tasks",
    "2",
    "--checkpoint-every",
    "2",
    "--device",
    "cpu",
    "--quiet",
]


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    return tmp_path_factory.mktemp("mtl-data")


@pytest.fixture(autouse=True)
def tiny_kanji(monkeypatch, data_home):
    """``--data kanji`` gives the tiny set; every other data set loads as usual."""
    monkeypatch.setenv("MTL_DATA", str(data_home))
    real = pipeline_cli._benchmark

    def benchmark(data, root, image_size, data_seed):
        if data == "kanji":
            return get_benchmark(
                "kanji", root=root, image_size=image_size, data_seed=data_seed, progress=False, **TINY_KANJI
            )
        return real(data, root, image_size, data_seed)

    monkeypatch.setattr(pipeline_cli, "_benchmark", benchmark)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_home):
    """A finished one-epoch pretraining run of conv4 on tiny kanji (28 px)."""
    out = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTL_DATA", str(data_home))
        config = PretrainConfig(
            backbone="conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2, val_ways=3, val_queries=2
        )
        pretrain(get_benchmark("kanji", progress=False, **TINY_KANJI), config, out, progress=False)
    return out


def mtl(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(code: int, args, *phrases: str) -> str:
    """Run ``mtl args``; check the exit code, that no traceback came out and the phrases of the Error line."""
    result = mtl(*args)
    # A traceback leaves its exception in result.exception; click's own exit is a SystemExit.
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def succeeds(args) -> str:
    result = mtl(*args)
    assert result.exit_code == 0, result.output
    return result.output


# 1. A checkpoint never runs code.


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this calls open(marker, "w"): the marker file shows whether code ran.
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("command", ["evaluate", "meta-train"])
def test_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path, command):
    marker, evil = tmp_path / "code-ran", tmp_path / "best.pt"
    torch.save({"kind": "pretrain", "backbone": _RunsCode(marker)}, evil)
    flag = "--checkpoint" if command == "evaluate" else "--pretrained"
    fails(1, [command, flag, evil, "--out", tmp_path / "out"], "refused", "do not load it")
    assert not marker.exists()


# 2. Divergence stops the run and keeps the last finite checkpoint.


def test_pretrain_divergence_stops_without_writing_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    fails(
        1,
        PRETRAIN + ["--lr", "1e6", "--out", out],
        "diverged at epoch 1, step",
        "lr 1e+06",
        "no checkpoint was written",
        "--lr 1e+05",
    )
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def test_resumed_lr_overrides_the_saved_one_and_divergence_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    last, best = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()
    # The saved lr is 0.1; 1e6 only diverges if the flag wins over it.
    fails(
        1,
        PRETRAIN + ["--epochs", "2", "--lr", "1e6", "--resume", "--out", out],
        "diverged at epoch 2",
        "last.pt (epoch 1)",
        "--resume --lr",
    )
    assert (out / "last.pt").read_bytes() == last and (out / "best.pt").read_bytes() == best
    succeeds(PRETRAIN + ["--epochs", "2", "--lr", "0.05", "--resume", "--out", out])
    lrs = np.loadtxt(out / "metrics.csv", delimiter=",", skiprows=1, usecols=3)
    assert lrs.tolist() == [0.1, 0.05]


@pytest.mark.parametrize(
    "flag, value",
    [("--inner-lr", "0"), ("--encoder-lr", "-1"), ("--iterations", "0"), ("--inner-steps", "-1"), ("--val-tasks", "0")],
)
def test_bad_meta_train_arguments_are_exit_2(tmp_path, flag, value):
    fails(2, META + [flag, value, "--out", tmp_path / "meta"], flag)
    assert not (tmp_path / "meta").exists()


def test_meta_train_divergence_names_the_lr_and_keeps_the_checkpoints(tmp_path, pretrained):
    meta, out = META + ["--pretrained", pretrained / "best.pt"], tmp_path / "meta"
    succeeds(meta + ["--out", out])
    last, best = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()
    # The saved encoder lr is 1e-4; 1e6 only diverges if the flag wins over it.
    fails(
        1,
        meta + ["--resume", "--iterations", "4", "--encoder-lr", "1e6", "--out", out],
        "diverged at iteration 3",
        "encoder_lr 1e+06",
        "last.pt (iteration 2)",
        "best.pt are kept",
        "--resume --encoder-lr 0.0001",
    )
    assert (out / "last.pt").read_bytes() == last and (out / "best.pt").read_bytes() == best
    succeeds(meta + ["--resume", "--iterations", "4", "--encoder-lr", "1e-5", "--out", out])
    lrs = np.loadtxt(out / "metrics.csv", delimiter=",", skiprows=1, usecols=5)
    assert lrs.tolist() == [1e-4, 1e-4, 1e-4, 1e-5, 1e-5]  # iteration 0 (validation only), then 1-4


def test_meta_train_divergence_at_the_first_update(tmp_path, pretrained):
    out = tmp_path / "meta"
    # Iteration 0 (the pretrained start, validated before any update) is checkpointed: the run
    # continues from there with a lower lr.
    fails(
        1,
        META + ["--pretrained", pretrained / "best.pt", "--head-lr", "1e6", "--out", out],
        "diverged at iteration 1",
        "the norm of θ",
        "head_lr 1e+06",
        "last.pt (iteration 0)",
        "best.pt are kept",
        "--resume --head-lr 0.001",
    )
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] == 0 and [row["iteration"] for row in state["metrics"]] == [0]


def test_meta_train_inner_divergence_at_the_first_validation(tmp_path, pretrained):
    # Issue #22: the validation of iteration 0 adapts with the same inner lr and now checks it
    # (its accuracy would be chance): the run stops there, before a checkpoint of that chance score.
    # 16 val tasks: whether a huge step overshoots depends on the support images (a separable
    # support set may just be fitted harder), so one task alone may or may not diverge.
    out = tmp_path / "meta"
    fails(
        1,
        META + ["--pretrained", pretrained / "best.pt", "--inner-lr", "1e6", "--val-tasks", "16", "--out", out],
        "diverged at iteration 0 (its validation, before any update)",
        "the inner loop diverged: the support loss went from",
        "inner_lr 1e+06",
        "no checkpoint was written yet",
        "--inner-lr 0.01",
    )
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


@pytest.mark.parametrize(
    "recipe",
    [
        {"lr": 0.05},
        {"lr": 1e-3, "optimizer": "adamw", "warmup_steps": 4, "label_smoothing": 0.1},
        {"lr": 0.05, "head": "cosine"},
    ],
)
def test_killed_cosine_run_resumes_bit_for_bit(tmp_path, monkeypatch, recipe):
    # On resume the schedule is rebuilt and stepped to where the run was (so that a new lr can
    # take its place); that must give the very lr sequence of an uninterrupted run.
    module = sys.modules["mtl_plugin.training.pretrain"]
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = PretrainConfig(
        backbone="conv4",
        epochs=3,
        batch_size=16,
        steps_per_epoch=3,
        val_tasks=2,
        val_ways=3,
        val_queries=2,
        schedule="cosine",
        **recipe,
    )
    full = pretrain(bench, config, tmp_path / "full", progress=False)
    real = module.evaluate
    # Killed in epoch 2, at its validation.
    monkeypatch.setattr(module, "evaluate", raising_at_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        pretrain(bench, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(module, "evaluate", real)
    resumed = pretrain(bench, config, tmp_path / "cut", progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "full" / "metrics.csv").read_text() == (tmp_path / "cut" / "metrics.csv").read_text()


def test_a_pretraining_killed_after_any_write_resumes_into_the_uninterrupted_run(tmp_path, monkeypatch):
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = PretrainConfig(
        backbone="conv4", epochs=3, batch_size=16, steps_per_epoch=2, val_tasks=2, val_ways=3, val_queries=2
    )
    full = pretrain(bench, config, tmp_path / "full", progress=False)
    writes = []
    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", killed_at_write(0, writes))
        pretrain(bench, config, tmp_path / "counted", progress=False)
    assert len(writes) >= 9  # best.pt (when better), last.pt, metrics.csv and curve.png per epoch
    for write in range(1, len(writes) + 1):
        folder = tmp_path / f"killed-{write}"
        with monkeypatch.context() as patched:
            patched.setattr(os, "replace", killed_at_write(write))
            with pytest.raises(KeyboardInterrupt):
                pretrain(bench, config, folder, progress=False)
        first_only = (folder / "best.pt").exists() and not (folder / "last.pt").exists()
        with pytest.warns(UserWarning, match="stopped between its first two writes") if first_only else nullcontext():
            resumed = pretrain(bench, config, folder, progress=False)
        for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (write, name)
        assert (folder / "metrics.csv").read_text() == (tmp_path / "full" / "metrics.csv").read_text(), write


# A tiny cosine run with a warmup, for the warmup tests.
TINY_WARMUP_RUN = dict(
    backbone="conv4", batch_size=16, val_tasks=2, val_ways=3, val_queries=2, schedule="cosine", lr=1e-3
)


def test_warmup_rises_linearly_to_the_lr_then_follows_the_schedule(tmp_path):
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = PretrainConfig(**TINY_WARMUP_RUN, epochs=3, steps_per_epoch=3, optimizer="adamw", warmup_steps=4)
    pretrain(bench, config, tmp_path / "run", progress=False)
    # The lr after each epoch: step 3 ends the 4 warmup steps (1 to 4 quarters of the lr), then
    # the cosine runs over the 5 steps left: 2 of them at step 6, all at step 9.
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    lrs = [float(row.split(",")[3]) for row in rows]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 5)), 0.0])
    with pytest.raises(UsageError, match="warmup_steps=9 must be fewer than the run's 9 steps"):
        pretrain(bench, replace(config, warmup_steps=9), tmp_path / "too-long", progress=False)


def test_a_warmup_share_is_that_share_of_the_steps_and_fits_a_run_of_any_length(tmp_path):
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = PretrainConfig(**TINY_WARMUP_RUN, epochs=2, steps_per_epoch=5, warmup_share=0.4)
    shared = pretrain(bench, config, tmp_path / "share", progress=False)
    counted = pretrain(bench, replace(config, warmup_share=0.0, warmup_steps=4), tmp_path / "count", progress=False)
    # 0.4 of 10 steps is the 4-step warmup: the same run.
    for a, b in zip(shared.state_dict().values(), counted.state_dict().values()):
        assert torch.equal(a, b)
    # A share near 1 of a one-step run still leaves the schedule its step, where a count is refused.
    pretrain(bench, replace(config, epochs=1, steps_per_epoch=1, warmup_share=0.9), tmp_path / "one", progress=False)
    with pytest.raises(UsageError, match="give one of them, not both"):
        replace(config, warmup_steps=4)
    with pytest.raises(UsageError, match=r"warmup_share=1 must be in \[0, 1\)"):
        replace(config, warmup_share=1)


def test_the_schedule_counts_the_batches_the_loader_yields(tmp_path):
    # 108 training images (18 classes of 6) in batches of 16: 6 full batches an epoch, the last 12
    # images dropped; a schedule of 7 steps an epoch would end the cosine short of 0.
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    assert len(bench.train_augmented) == 108
    config = PretrainConfig(
        backbone="conv4", epochs=2, batch_size=16, val_tasks=2, val_ways=3, val_queries=2, schedule="cosine"
    )
    pretrain(bench, config, tmp_path / "run", progress=False)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    lrs = [float(row.split(",")[3]) for row in rows]
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 12)), 0.0], abs=1e-12)


def test_meta_train_refuses_flags_the_other_flags_make_meaningless(tmp_path, pretrained):
    best = pretrained / "best.pt"
    fails(2, ["meta-train", "--pretrained", best, "--backbone", "conv4", "--out", tmp_path / "a"], "drop --backbone")
    fails(2, ["meta-train", "--pretrained", best, "--hard-meta-batch", 4, "--out", tmp_path / "b"], "add --hard-tasks")
    fails(2, ["meta-train", "--pretrained", best, "--hard-task-mode", "reuse", "--out", tmp_path / "c"], "--hard-tasks")
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["data", "kanji", "--instances", "99999999999999999999"], "--instances"),
        (["evaluate", "--checkpoint", "x.pt", "--tasks", "3000000000"], "--tasks"),
        (["pretrain", "--batch-size", "100000000000000000000"], "--batch-size"),
        (["pretrain", "--val-tasks", "100000000000000000000"], "--val-tasks"),
        (["meta-train", "--iterations", "3000000000"], "--iterations"),
        (["bench", "--test-tasks", "3000000000"], "--test-tasks"),
    ],
)
def test_a_count_too_large_for_the_libraries_is_exit_2_before_any_work(tmp_path, args, flag):
    # Each failed deep in learn2learn, numpy or itertools (an overflow, a hang), some after training.
    fails(2, [*args, *(["--out", tmp_path / "out"] if args[0] != "data" else [])], flag, "2147483647")
    assert not (tmp_path / "out").exists()


def test_a_kanji_set_too_large_for_memory_is_refused_with_the_most_it_can_hold():
    fails(2, ["data", "kanji", "--instances", "9999999"], "GiB of images", "at most 3,423 instances")


def test_a_run_saved_before_the_adamw_options_resumes(tmp_path):
    # Its config lacks optimizer, warmup_steps, label_smoothing and head: it trained with their defaults.
    succeeds(PRETRAIN + ["--out", tmp_path])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for name in ("optimizer", "warmup_steps", "label_smoothing", "head"):
        del state["config"][name]
    torch.save(state, tmp_path / "last.pt")
    succeeds(PRETRAIN + ["--resume", "--epochs", "2", "--out", tmp_path])
    fails(
        2,
        PRETRAIN + ["--resume", "--epochs", "2", "--optimizer", "adamw", "--out", tmp_path],
        "optimizer 'sgd' -> 'adamw'",
        "--override",
    )


def test_the_record_of_a_config_keeps_the_later_options_out_at_their_defaults():
    # The bench names its pretraining folder by a digest of this record: older folders stay valid.
    assert set(PretrainConfig.quick().record()) == set(asdict(PretrainConfig())) - {
        "optimizer",
        "warmup_steps",
        "label_smoothing",
        "head",
    }
    assert PretrainConfig(optimizer="adamw", label_smoothing=0.1).record()["optimizer"] == "adamw"
    assert PretrainConfig(head="cosine").record()["head"] == "cosine"


# 3. Wrong numbers are refused before any work.


@pytest.mark.parametrize(
    "flag, value", [("--shots", "0"), ("--shots", "-1"), ("--queries", "0"), ("--ways", "1"), ("--tasks", "0")]
)
def test_evaluate_refuses_impossible_task_shapes(pretrained, flag, value):
    fails(2, EVALUATE + ["--checkpoint", pretrained / "best.pt", flag, value], flag)


def test_evaluate_refuses_tasks_the_split_cannot_give(pretrained):
    fails(2, EVALUATE + ["--checkpoint", pretrained / "best.pt", "--ways", "9"], "test split", "ways=9")


# 4. No silent overwrite, no silent config drift.


def test_pretrain_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    best = (out / "best.pt").read_bytes()
    fails(2, PRETRAIN + ["--lr", "0.01", "--out", out], "already holds a pretraining run", "--resume", "--overwrite")
    fails(2, PRETRAIN + ["--resume", "--lr", "0.01", "--out", out], "finished", "--overwrite")
    fails(2, PRETRAIN + ["--resume", "--overwrite", "--out", out], "pass one of them")
    assert (out / "best.pt").read_bytes() == best
    succeeds(PRETRAIN + ["--resume", "--out", out])  # a finished run is reused as is
    assert (out / "best.pt").read_bytes() == best
    succeeds(PRETRAIN + ["--overwrite", "--seed", "1", "--out", out])
    assert (out / "best.pt").read_bytes() != best


def test_resume_refuses_settings_that_change_the_experiment(tmp_path):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    fails(2, PRETRAIN + ["--resume", "--epochs", "2", "--seed", "1", "--out", out], "seed 0 -> 1", "--override")
    fails(2, PRETRAIN + ["--resume", "--epochs", "2", "--schedule", "cosine", "--out", out], "schedule", "--override")
    fails(2, PRETRAIN + ["--override", "--out", tmp_path / "other"], "--resume")
    fails(
        1, PRETRAIN + ["--resume", "--epochs", "2", "--image-size", "32", "--out", out], "other data", "image_size 28"
    )
    succeeds(PRETRAIN + ["--resume", "--epochs", "2", "--seed", "1", "--override", "--out", out])


def test_meta_train_refuses_to_overwrite_a_run(tmp_path, pretrained):
    meta, out = META + ["--pretrained", pretrained / "best.pt"], tmp_path / "meta"
    succeeds(meta + ["--out", out])
    best = (out / "best.pt").read_bytes()
    fails(2, meta + ["--out", out], "already holds a meta-training run", "--resume", "--overwrite")
    fails(2, meta + ["--resume", "--encoder-lr", "0.01", "--out", out], "finished", "more --iterations")
    fails(2, meta + ["--resume", "--overwrite", "--out", out], "pass one of them")
    assert (out / "best.pt").read_bytes() == best
    assert "best val accuracy" in succeeds(meta + ["--resume", "--out", out])  # a finished run is reused as is
    assert (out / "best.pt").read_bytes() == best
    succeeds(meta + ["--overwrite", "--seed", "1", "--out", out])
    assert (out / "best.pt").read_bytes() != best


def test_meta_train_resume_refuses_settings_that_change_the_experiment(tmp_path, pretrained):
    meta, out = META + ["--pretrained", pretrained / "best.pt"], tmp_path / "meta"
    succeeds(meta + ["--out", out])
    more = meta + ["--resume", "--iterations", "3", "--out", out]
    fails(2, more + ["--shots", "2"], "shots 1 -> 2", "--override")
    fails(2, more + ["--hard-tasks"], "hard_tasks False -> True", "--override")
    fails(2, META + ["--pretrained", pretrained / "best.pt", "--override", "--out", tmp_path / "other"], "--resume")
    fails(1, more + ["--granularity", "channel"], "other data or another model", "granularity 'kernel'")
    fails(1, more + ["--data-seed", "1"], "other data", "train_data.")
    succeeds(more + ["--shots", "2", "--override"])


def test_resume_of_a_checkpoint_from_before_the_data_record(tmp_path, pretrained):
    # Checkpoints written before they recorded their data set have no "data" entry.
    out = tmp_path / "run"
    for name in ("best.pt", "last.pt"):
        state = torch.load(pretrained / name, weights_only=True)
        del state["model"]["data"]
        out.mkdir(exist_ok=True)
        torch.save(state, out / name)
    fails(1, PRETRAIN + ["--resume", "--epochs", "2", "--out", out], "older mtl", "data", "--override")
    succeeds(PRETRAIN + ["--resume", "--epochs", "2", "--override", "--out", out])


def test_library_meta_train_refuses_to_start_over_a_run(tmp_path, pretrained):
    from mtl_plugin.meta_transfer import MetaTrainConfig, MetaTransferLearner
    from mtl_plugin.ss import SSAdapter
    from mtl_plugin.training.meta_training import meta_train
    from mtl_plugin.training.pretrain_checkpoint import load_pretrained

    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = MetaTrainConfig(ways=3, queries=2, inner_steps=1, iterations=1, val_every=1, val_tasks=2)
    learner = MetaTransferLearner(SSAdapter(load_pretrained(pretrained / "best.pt")), 3, config)
    meta_train(learner, bench, tmp_path, progress=False)
    with pytest.raises(UsageError, match="already holds a meta-training run"):
        meta_train(learner, bench, tmp_path, progress=False)
    config.seed = 1
    with pytest.raises(UsageError, match="seed 0 -> 1"):
        meta_train(learner, bench, tmp_path, resume=True, progress=False)


def test_library_pretrain_refuses_to_start_over_a_run(tmp_path, pretrained):
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = PretrainConfig(
        backbone="conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2, val_ways=3, val_queries=2
    )
    with pytest.raises(UsageError, match="already holds"):
        pretrain(bench, config, pretrained, resume=False, progress=False)
    with pytest.raises(UsageError, match="lr 0.1 -> 0.01|new lr changes nothing"):
        pretrain(bench, PretrainConfig(**{**config.__dict__, "lr": 0.01}), pretrained, progress=False)


# 5. User mistakes: one Error line, no traceback.


def _mini_imagenet_pickle(path, cut: bool):
    archive = {"image_data": np.zeros((4, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 1], "b": [2, 3]}}
    data = pickle.dumps(archive)
    path.write_bytes(data[: len(data) // 2] if cut else data)


@pytest.mark.parametrize(
    "case", ["missing root", "empty folder", "missing split", "empty class folder", "garbage pkl", "truncated pkl"]
)
def test_bad_data_is_exit_1(tmp_path, case):
    root = tmp_path / "data"
    if case == "missing root":
        args, phrase = ["--data", "mini-imagenet", "--root", root], "does not exist"
    elif case == "empty folder":
        root.mkdir()
        args, phrase = ["--data", "folder", "--root", root], "expected the folder"
    elif case in ("missing split", "empty class folder"):
        for split in ("train",) if case == "missing split" else ("train", "val", "test"):
            for c in range(3):
                (root / split / f"c{c}").mkdir(parents=True)
                if case == "missing split" or c:
                    Image.new("L", (20, 20)).save(root / split / f"c{c}" / "0.png")
        args, phrase = ["--data", "folder", "--root", root], "val" if case == "missing split" else "holds no"
    else:
        root.mkdir()
        target = root / "mini-imagenet-cache-train.pkl"
        if case == "garbage pkl":
            target.write_bytes(b"this is not a pickle at all")
        else:
            _mini_imagenet_pickle(target, cut=True)
        args, phrase = ["--data", "mini-imagenet", "--root", root], "not a readable pickle"
    fails(1, PRETRAIN + args + ["--out", tmp_path / "out"], phrase)
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--data", "imagenet-21k"], ["unknown data set 'imagenet-21k'", "kanji"]),
        (["--backbone", "nope"], ["unknown backbone 'nope'", "resnet12"]),
        (["--image-size", "3"], ["--image-size 8"]),
        (["--backbone", "resnet12", "--image-size", "12"], ["too small for resnet12", "--image-size 16"]),
        (["--device", "gpu"], ["--device 'gpu'", "cpu"]),
        (["--val-queries", "6"], ["val split", "has 6 images but a task needs 7"]),
    ],
)
def test_bad_pretrain_arguments_are_exit_2(tmp_path, args, phrases):
    # The last --backbone wins, so PRETRAIN's conv4 is replaced where a case names another.
    fails(2, PRETRAIN + args + ["--out", tmp_path / "out"], *phrases)


def test_unknown_backbone_in_meta_train_and_bench(tmp_path):
    fails(2, ["meta-train", "--backbone", "nope", "--out", tmp_path / "meta"], "unknown backbone 'nope'")
    fails(
        2, ["bench", "--profile", "quick", "--backbone", "nope", "--out", tmp_path / "bench"], "unknown backbone 'nope'"
    )
    assert not (tmp_path / "bench").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["pretrain", "evaluate", "meta-train", "bench"])
def test_cuda_without_a_gpu_is_exit_2(tmp_path, command):
    args = {
        "pretrain": PRETRAIN,
        "evaluate": EVALUATE + ["--checkpoint", tmp_path / "x.pt"],
        "meta-train": ["meta-train"],
        "bench": ["bench"],
    }[command]
    fails(2, args + ["--device", "cuda", "--out", tmp_path / "out"], "--device cuda", "no CUDA GPU", "cpu")


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("missing", "no checkpoint there"),
        ("empty", "empty (0 bytes)"),
        ("truncated", "truncated"),
        ("text", "not a PyTorch checkpoint"),
        ("tensor", "not a checkpoint written by mtl"),
        ("pretrain last.pt", "resumable state of mtl pretrain"),
    ],
)
def test_bad_checkpoint_is_exit_1(tmp_path, pretrained, case, phrase):
    path = tmp_path / "best.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        data = (pretrained / "best.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("these are notes, not weights\n")
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "pretrain last.pt":
        path = pretrained / "last.pt"
    fails(1, EVALUATE + ["--checkpoint", path], "--checkpoint", phrase)


def test_read_checkpoint_of_any_dict_is_safe_and_names_bad_files(tmp_path):
    marker, evil = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save({"weights": _RunsCode(marker)}, evil)
    with pytest.raises(DataError, match="refused"):
        read_checkpoint(evil, require_kind=False)
    assert not marker.exists()
    with pytest.raises(MissingDataError, match="no checkpoint there"):
        read_checkpoint(tmp_path / "none.pt", require_kind=False)
    torch.save({"step": 3}, tmp_path / "plain.pt")  # any dict, not only mtl's kinds
    assert read_checkpoint(tmp_path / "plain.pt", require_kind=False) == {"step": 3}


def test_each_kind_of_checkpoint_has_one_public_reader_that_refuses_the_other(tmp_path, pretrained):
    import mtl_plugin
    from mtl_plugin.training.checkpoints import load_learner_weights

    meta = tmp_path / "meta"
    succeeds(META + ["--pretrained", pretrained / "best.pt", "--out", meta])
    state = mtl_plugin.read_pretrain_checkpoint(pretrained / "best.pt")
    assert state["kind"] == "pretrain" and state["model"]["backbone"] == "conv4" and "backbone" in state
    assert mtl_plugin.read_meta_checkpoint(meta / "best.pt")["kind"] == "meta-transfer"
    assert "optimizer" in mtl_plugin.read_meta_checkpoint(meta / "last.pt", "--out")
    with pytest.raises(DataError, match="--checkpoint .*a 'pretrain' checkpoint, not one of meta-training"):
        mtl_plugin.read_meta_checkpoint(pretrained / "best.pt", "--checkpoint")
    with pytest.raises(DataError, match="--pretrained .*not one of mtl pretrain"):
        mtl_plugin.read_pretrain_checkpoint(meta / "best.pt", "--pretrained")
    with pytest.raises(DataError, match="resumable state of mtl pretrain"):
        mtl_plugin.read_pretrain_checkpoint(pretrained / "last.pt")
    # Weights that do not fit are one DataError naming the file; a run folder's says how to start anew.
    learner = mtl_plugin.load_learner(meta / "best.pt")
    with pytest.raises(DataError, match="--out .*best.pt has no tensor .*pass --overwrite"):
        load_learner_weights(learner, {"learner": {}}, meta / "best.pt", "--out")


@pytest.mark.parametrize(
    "args, code, phrase",
    [
        (["kanji", "--num-classes", "1"], 2, "num_classes=1"),
        (["kanji", "--image-size", "4"], 2, "image_size=4"),
        (["info", "folder"], 2, "needs root="),
        (["info", "mini-imagenet", "--root", "nowhere"], 1, "does not exist"),
    ],
)
def test_data_command_mistakes_are_exit_2_and_bad_files_exit_1(tmp_path, args, code, phrase):
    fails(code, ["data"] + args + (["--cache-dir", tmp_path] if args[0] == "kanji" else []), phrase)


def test_checkpoint_of_other_image_size_or_channels_is_exit_1(tmp_path, pretrained):
    fails(
        1,
        EVALUATE + ["--checkpoint", pretrained / "best.pt", "--image-size", "32"],
        "kanji images of 1 x 28 px",
        "gives 1 x 32 px",
    )
    for split in ("train", "val", "test"):
        for c in range(3):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (28, 28)).save(tmp_path / split / f"c{c}" / f"{k}.png")
    fails(
        1,
        EVALUATE + ["--checkpoint", pretrained / "best.pt", "--data", "folder", "--root", tmp_path],
        "1 x 28 px",
        "folder gives 3 x 28 px",
    )
    # Without --image-size the checkpoint's size is used.
    assert "test 3-way 1-shot" in succeeds(EVALUATE + ["--checkpoint", pretrained / "best.pt"])


@pytest.mark.parametrize("command", ["pretrain", "meta-train", "bench"])
def test_output_folder_that_cannot_be_written_is_exit_2(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = {
        "pretrain": PRETRAIN,
        "meta-train": ["meta-train", "--backbone", "conv4", "--ways", "3", "--queries", "2", "--device", "cpu"],
        "bench": ["bench", "--profile", "quick", "--device", "cpu"],
    }[command]
    fails(2, args + ["--out", blocker / "run"], "--out", "cannot write there")


# 6. Mistakes found before the long work, not after it.


def test_evaluate_checks_its_output_file_before_evaluating(tmp_path, pretrained):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    output = fails(
        2, EVALUATE + ["--checkpoint", pretrained / "best.pt", "--out", blocker / "r.json"], "cannot write there"
    )
    assert "%" not in output


def test_bench_checks_tasks_and_data_before_pretraining(tmp_path):
    fails(2, ["bench", "--profile", "quick", "--ways", "1", "--out", tmp_path / "b"], "--ways")
    fails(
        1,
        ["bench", "--profile", "quick", "--data", "folder", "--root", tmp_path / "none", "--out", tmp_path / "b"],
        "expected the folder",
    )
    assert not (tmp_path / "b" / "pretrain").exists()


def test_typed_errors_stay_value_and_file_errors_for_library_users(tmp_path):
    with pytest.raises(FileNotFoundError):
        get_benchmark("mini-imagenet", root=tmp_path)
    assert issubclass(MissingDataError, DataError) and issubclass(DataError, ValueError)
    with pytest.raises(ValueError, match="unknown data set"):
        get_benchmark("imagenet-21k")


# Issue #22. 1. A run folder is never lost or mixed.


def test_evaluate_out_may_not_be_its_checkpoint(tmp_path, pretrained):
    model = tmp_path / "best.pt"
    model.write_bytes((pretrained / "best.pt").read_bytes())
    fails(2, EVALUATE + ["--checkpoint", model, "--out", model], "--out", "is the input --checkpoint")
    assert model.read_bytes() == (pretrained / "best.pt").read_bytes()


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_meta_train_out_may_not_hold_its_pretrained_checkpoint(tmp_path, pretrained, flags):
    before = {path.name: path.read_bytes() for path in pretrained.iterdir()}
    fails(
        2, META + ["--pretrained", pretrained / "best.pt", "--out", pretrained] + flags, "holds the input --pretrained"
    )
    assert {path.name: path.read_bytes() for path in pretrained.iterdir()} == before


def _hold_in_another_process(folder):
    """A process holding ``folder`` as a run would; it has printed its pid once the lock is held."""
    import subprocess

    code = (
        "import sys, time; from mtl_plugin.training.run_log import hold_run_folder\n"
        "with hold_run_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_folder_is_held_for_the_whole_run(tmp_path, pretrained):
    from mtl_plugin.training.run_log import LOCK_FILE

    out = tmp_path / "run"
    holder = _hold_in_another_process(out)
    try:
        fails(
            2,
            PRETRAIN + ["--out", out],
            f"--out {out} is in use by another mtl run",
            f"process {holder.pid}",
            "another --out",
        )
        fails(2, META + ["--pretrained", pretrained / "best.pt", "--out", out], "in use by another mtl run")
        bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
        with pytest.raises(UsageError, match="in use by another mtl run"):
            pretrain(bench, PretrainConfig(backbone="conv4", epochs=1), out, progress=False)
        assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]
    finally:
        # kill -9: the operating system lets the lock go with the process.
        holder.kill()
        holder.wait()
    succeeds(PRETRAIN + ["--out", out])
    assert not (out / LOCK_FILE).exists()


def test_a_file_system_without_locks_runs_unheld_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def refused(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available.*one run per folder"):
        succeeds(PRETRAIN + ["--out", tmp_path / "run"])
    assert (tmp_path / "run" / "best.pt").is_file()


def test_a_killed_runs_temporary_files_are_removed(tmp_path):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    # What kill -9 during an atomic write leaves (mtl_plugin.utils.io.atomic_open's names).
    for name in (".curve.png.k2j4_x.tmp", ".last.pt.a8f3.tmp", ".metrics.csv.zz.tmp"):
        (out / name).write_bytes(b"half a file")
    (out / "notes.tmp").write_text("the user's own file")
    succeeds(PRETRAIN + ["--resume", "--epochs", "2", "--out", out])
    assert sorted(path.name for path in out.iterdir()) == [
        "best.pt",
        "curve.png",
        "last.pt",
        "metrics.csv",
        "notes.tmp",
    ]


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, pretrained, monkeypatch):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    fails(1, PRETRAIN + ["--overwrite", "--lr", "1e6", "--out", out], "diverged at epoch 1")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    succeeds(PRETRAIN + ["--overwrite", "--seed", "1", "--out", out])
    assert torch.load(out / "last.pt", weights_only=True)["config"]["seed"] == 1

    meta, out = META + ["--pretrained", pretrained / "best.pt"], tmp_path / "meta"
    succeeds(meta + ["--out", out])
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    module = sys.modules["mtl_plugin.training.meta_training"]
    # Stopped at its first validation, before it wrote anything.
    monkeypatch.setattr(module, "evaluate", raising_at_call(module.evaluate, 1, RuntimeError("stopped")))
    assert isinstance(mtl(*meta, "--overwrite", "--seed", "1", "--out", out).exception, RuntimeError)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


# Issue #22. 2. Ctrl-C.


@pytest.mark.parametrize("command", ["pretrain", "meta-train"])
def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, pretrained, monkeypatch, command):
    module = sys.modules[
        {"pretrain": "mtl_plugin.training.pretrain", "meta-train": "mtl_plugin.training.meta_training"}[command]
    ]
    monkeypatch.setattr(module, "evaluate", raising_at_call(module.evaluate, 1))
    args = PRETRAIN if command == "pretrain" else META + ["--pretrained", pretrained / "best.pt"]
    fails(130, args + ["--out", tmp_path / "run"], "interrupted (Ctrl-C)", f"mtl {command}", "--resume")


def test_ctrl_c_in_evaluate_exits_130(pretrained, monkeypatch):
    monkeypatch.setattr(pipeline_cli, "evaluate", raising_at_call(pipeline_cli.evaluate, 1))
    fails(130, EVALUATE + ["--checkpoint", pretrained / "best.pt"], "interrupted (Ctrl-C)", "mtl evaluate again")


# Issue #22. 3. No wrong result with exit 0.


def _nan_copy(source, target, entry):
    """``source`` saved to ``target`` with the first floating-point tensor of ``state[entry]`` set to NaN."""
    state = torch.load(source, weights_only=True)
    weights = state[entry]
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return name


def test_a_checkpoint_with_nan_weights_is_refused_at_load(tmp_path, pretrained):
    name = _nan_copy(pretrained / "best.pt", tmp_path / "nan" / "best.pt", "backbone")
    fails(
        1,
        EVALUATE + ["--checkpoint", tmp_path / "nan" / "best.pt"],
        f"backbone.{name} holds NaN or infinite",
        "a run that did not diverge",
    )
    fails(
        1,
        META + ["--pretrained", tmp_path / "nan" / "best.pt", "--out", tmp_path / "meta"],
        "--pretrained",
        "NaN or infinite",
    )
    meta = tmp_path / "good-meta"
    succeeds(META + ["--pretrained", pretrained / "best.pt", "--out", meta])
    _nan_copy(meta / "best.pt", tmp_path / "nan-meta" / "best.pt", "learner")
    fails(1, EVALUATE + ["--checkpoint", tmp_path / "nan-meta" / "best.pt"], "learner.", "NaN or infinite")
    # A last.pt of broken weights: refused with the way on (was: an endless "lower the lr" loop).
    run = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", run])
    _nan_copy(run / "last.pt", run / "last.pt", "classifier")
    fails(1, PRETRAIN + ["--resume", "--epochs", "2", "--out", run], "last.pt", "NaN or infinite", "--overwrite")


def _image_folder(root, classes=(4, 4, 4), images=4, side=16, seed=0, mode="L"):
    """``root/{train,val,test}/c<k>/<i>.png``: ``classes`` per split, seeded noise images."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), classes):
        for c in range(count):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(images):
                pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
                Image.fromarray(pixels).convert(mode).save(root / split / f"c{c}" / f"{i}.png")
    return root


FOLDER = ["--data", "folder", "--image-size", "16"]


def test_resume_on_another_or_changed_image_folder_is_refused(tmp_path):
    data, out = _image_folder(tmp_path / "data"), tmp_path / "run"
    succeeds(PRETRAIN + FOLDER + ["--root", data, "--out", out])
    # Another folder with as many classes (was: resumed on it, exit 0).
    other = _image_folder(tmp_path / "other", seed=1)
    fails(
        1,
        PRETRAIN + FOLDER + ["--root", other, "--resume", "--epochs", "2", "--out", out],
        "other data",
        "data.content",
    )
    # The same folder, one training image replaced in place.
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "train" / "c0" / "0.png")
    fails(1, PRETRAIN + FOLDER + ["--root", data, "--resume", "--epochs", "2", "--out", out], "data.content")
    # A copy of the folder elsewhere is the same data.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(other, copy)
    assert get_benchmark("folder", root=copy).content == get_benchmark("folder", root=other).content


def test_hidden_folders_are_not_classes(tmp_path):
    data = _image_folder(tmp_path / "data")
    for split in ("train", "val", "test"):
        for hidden in (".ipynb_checkpoints", ".cache"):
            (data / split / hidden).mkdir()
            Image.new("L", (16, 16)).save(data / split / hidden / "0.png")
        Image.new("L", (16, 16)).save(data / split / "c0" / "._0.png")  # what macOS leaves on other disks
    bench = get_benchmark("folder", root=data)
    assert [len(getattr(bench, split).labels) for split in ("train", "val", "test")] == [4, 4, 4]
    assert len(bench.train) == 16
    fails(
        2,
        PRETRAIN + FOLDER + ["--root", data, "--val-ways", "5", "--out", tmp_path / "run"],
        "val split",
        "ways=5",
        "(4)",
    )


def test_sixteen_bit_grayscale_images_are_scaled_not_white(tmp_path):
    from mtl_plugin.data.images import FileSource

    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 0 .. 65535
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = FileSource([tmp_path / "wide.png"])[0]
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), np.arange(256).reshape(16, 16))
    assert np.asarray(image.convert("RGB"))[..., 0].tolist() == np.arange(256).reshape(16, 16).tolist()


def test_pretraining_on_one_train_class_is_refused(tmp_path):
    data = _image_folder(tmp_path / "data", classes=(1, 4, 4))
    fails(
        1, PRETRAIN + FOLDER + ["--root", data, "--out", tmp_path / "run"], "the train split has 1 class", "at least 2"
    )
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_diverging_test_time_adaptation_is_an_error_not_chance(tmp_path, pretrained):
    # Features a hundred times larger (a ResNet-12 pretrained long gives norms of thousands): the
    # default inner lr then overshoots on every step and the head ends at chance level.
    state = torch.load(pretrained / "best.pt", weights_only=True)
    weights = state["backbone"]
    last_bn = [name for name, value in weights.items() if name.endswith(".weight") and value.dim() == 1][-1]
    for name in (last_bn, last_bn.replace("weight", "bias")):
        weights[name] = weights[name] * 100
    torch.save(state, tmp_path / "large.pt")
    args = EVALUATE + ["--checkpoint", tmp_path / "large.pt", "--shots", "4"]
    fails(
        1,
        args,
        "test-time adaptation diverged",
        "the support loss went from",
        "inner_lr 0.01",
        "--inner-lr, e.g. 0.001",
    )
    assert "test 3-way 4-shot" in succeeds(args + ["--inner-lr", "1e-6"])


# Issue #22. 4. Tracebacks for bad input or a full disk.


@pytest.mark.parametrize("failure", ["OSError", "RuntimeError"])
def test_a_full_disk_during_a_save_is_one_error_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, failure):
    import errno

    from mtl_plugin.utils import io as atomic_io

    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def full(*args, **kwargs):
        if failure == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        # What torch.save's zip writer raises when the disk fills under it.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    if failure == "OSError":
        monkeypatch.setattr(atomic_io.os, "fsync", full)
    else:
        monkeypatch.setattr(atomic_io.torch, "save", full)
    fails(
        1,
        PRETRAIN + ["--resume", "--epochs", "2", "--out", out],
        "could not be written",
        "No space left on device" if failure == "OSError" else "unexpected pos",
        "is kept",
        "--resume",
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_evaluate_out_on_a_full_disk_fails_before_the_tasks_run(tmp_path, pretrained, monkeypatch):
    import errno
    import json
    import os

    from mtl_plugin.utils import io as atomic_io

    out = tmp_path / "result.json"
    out.write_text("before\n")
    real_fallocate, real_evaluate = atomic_io.os.posix_fallocate, pipeline_cli.evaluate

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "posix_fallocate", full)
    monkeypatch.setattr(
        pipeline_cli, "evaluate", lambda *a, **k: pytest.fail("ran the tasks before taking --out's room")
    )
    args = EVALUATE + ["--checkpoint", pretrained / "best.pt", "--out", out]
    fails(1, args, "result.json: could not be written", "No space left on device", "is kept")
    assert out.read_text() == "before\n" and [path.name for path in tmp_path.iterdir()] == ["result.json"]
    # With room, the reserved bytes hold the JSON and nothing more; the file gets the user's umask.
    monkeypatch.setattr(atomic_io.os, "posix_fallocate", real_fallocate)
    monkeypatch.setattr(pipeline_cli, "evaluate", real_evaluate)
    previous = os.umask(0o027)
    try:
        succeeds(args)
    finally:
        os.umask(previous)
    record = json.loads(out.read_text())
    assert (record["tasks"], record["ways"], record["checkpoint"]) == (2, 3, str(pretrained / "best.pt"))
    assert out.stat().st_mode & 0o777 == 0o640 and [path.name for path in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("command", ["pretrain", "meta-train", "evaluate", "bench", "data"])
@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_seeds_out_of_range_are_exit_2_in_every_command(tmp_path, command, seed):
    args = {
        "pretrain": PRETRAIN + ["--seed", seed],
        "meta-train": META + ["--seed", seed],
        "evaluate": EVALUATE + ["--checkpoint", tmp_path / "x.pt", "--seed", seed],
        "bench": ["bench", "--profile", "quick", "--seed", seed],
        "data": ["data", "kanji", "--seed", seed],
    }[command]
    fails(
        2,
        args + (["--cache-dir", tmp_path] if command == "data" else ["--out", tmp_path / "out"]),
        "--seed",
        "0<=x<=4294967295",
    )
    fails(2, PRETRAIN + ["--data-seed", seed, "--out", tmp_path / "out"], "--data-seed")
    with pytest.raises(UsageError, match="a seed is an integer from 0 to"):
        PretrainConfig(seed=int(seed))


@pytest.mark.parametrize("channels", ["-3", "0"])
def test_ss_report_needs_one_or_more_input_channels(channels):
    fails(2, ["ss-report", "resnet18", "--in-channels", channels], "--in-channels", "1<=x<=2147483647")


def test_a_backbone_that_does_not_take_the_image_size_is_refused_before_the_data(tmp_path):
    # The data folder does not exist: the backbone is checked first.
    fails(
        2,
        PRETRAIN
        + [
            "--backbone",
            "vit_b_16",
            "--image-size",
            "16",
            "--data",
            "folder",
            "--root",
            tmp_path / "none",
            "--out",
            tmp_path / "run",
        ],
        "vit_b_16 does not take images of 16 px",
        "Expected 224 but got 16",
        "--image-size",
    )
    fails(2, PRETRAIN + ["--image-size", "100000", "--out", tmp_path / "run"], "--image-size 2048 or less")


def test_a_checkpoint_with_an_absurd_image_size_is_refused_before_building(tmp_path, pretrained):
    state = torch.load(pretrained / "best.pt", weights_only=True)
    state["model"]["image_size"] = 100000
    torch.save(state, tmp_path / "best.pt")
    fails(1, EVALUATE + ["--checkpoint", tmp_path / "best.pt"], "image_size 100000", "damaged")
    fails(
        1,
        META + ["--pretrained", tmp_path / "best.pt", "--out", tmp_path / "meta"],
        "--pretrained",
        "image_size 100000",
    )


@pytest.mark.parametrize(
    "class_dict, phrase",
    [
        ({"a": [0, 1], "b": [2, 9]}, "class 'b' of 'class_dict' lists image 9, but the file holds images 0 to 3"),
        ({"a": [0, 1], "b": [-1, 2]}, "lists image -1"),
        ({"a": [0, 1, 2, 3], "b": []}, "class 'b' of 'class_dict' lists no image"),
    ],
)
def test_a_mini_imagenet_pickle_with_a_bad_class_dict_is_exit_1(tmp_path, class_dict, phrase):
    root = tmp_path / "data"
    root.mkdir()
    archive = {"image_data": np.zeros((4, 84, 84, 3), np.uint8), "class_dict": class_dict}
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(archive))
    fails(
        1,
        PRETRAIN + ["--data", "mini-imagenet", "--root", root, "--out", tmp_path / "out"],
        "mini-imagenet-cache-train.pkl",
        phrase,
    )


# Issue #22. 5. Messages that misled, values accepted that should not be.


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--optimizer", "adam"], "'adam' is not one of 'sgd', 'adamw'"),
        (["--warmup-steps", "-1"], "0<=x<=2147483647"),
        (["--warmup-share", "1"], "0<=x<1"),
        (["--label-smoothing", "1"], "0<=x<1"),
    ],
)
def test_bad_optimizer_warmup_or_label_smoothing_is_exit_2(tmp_path, args, phrase):
    fails(2, PRETRAIN + args + ["--out", tmp_path / "run"], args[0], phrase)


@pytest.mark.parametrize("args", [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "nan"]])
def test_non_finite_pretrain_rates_are_exit_2(tmp_path, args):
    fails(2, PRETRAIN + args + ["--out", tmp_path / "run"], args[0], "is not a finite number")
    with pytest.raises(UsageError, match="finite"):
        PretrainConfig(**{args[0][2:].replace("-", "_"): float(args[1])})


@pytest.mark.parametrize(
    "command, args",
    [
        ("meta-train", ["--encoder-lr", "inf"]),
        ("meta-train", ["--inner-lr", "nan"]),
        ("evaluate", ["--inner-lr", "inf"]),
        ("evaluate", ["--inner-steps", "-5"]),
        ("evaluate", ["--tasks", "1"]),
    ],
)
def test_meta_train_and_evaluate_refuse_values_that_would_mislead(tmp_path, pretrained, command, args):
    base = META if command == "meta-train" else EVALUATE + ["--checkpoint", pretrained / "best.pt"]
    fails(2, base + args + ["--out", tmp_path / "out"], args[0])


def test_one_task_shows_no_confidence_interval():
    from mtl_plugin.evaluation import EvaluationResult

    assert str(EvaluationResult([40.0])) == "40.00 % (1 task: no confidence interval)"
    assert "±" in str(EvaluationResult([40.0, 60.0]))


def test_a_truncated_last_pt_advises_overwrite_not_a_best_pt(tmp_path):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    error = fails(1, PRETRAIN + ["--resume", "--epochs", "2", "--out", out], "last.pt", "truncated", "--overwrite")
    assert "best.pt" not in error


@pytest.mark.parametrize("flags", [[], ["--resume"]])
def test_best_pt_without_last_pt_points_to_overwrite_only(tmp_path, flags):
    out = tmp_path / "run"
    succeeds(PRETRAIN + ["--out", out])
    (out / "last.pt").unlink()
    error = fails(
        2, PRETRAIN + flags + ["--out", out], "holds best.pt but no last.pt", "cannot be resumed", "--overwrite"
    )
    assert "pass --resume" not in error


def test_a_split_of_one_class_does_not_suggest_one_way(tmp_path):
    data = _image_folder(tmp_path / "data", classes=(4, 1, 4))
    error = fails(
        2, PRETRAIN + FOLDER + ["--root", data, "--out", tmp_path / "run"], "val split", "holds 1 class", "add classes"
    )
    assert "at most 1" not in error


def test_the_same_images_in_two_splits_are_warned_about(tmp_path):
    import shutil

    data = _image_folder(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_benchmark("folder", root=data)  # disjoint splits: no warning
    shutil.copy(data / "test" / "c1" / "2.png", data / "train" / "c3" / "copy.png")
    with pytest.warns(
        UserWarning,
        match=r"1 image\(s\) of the test split are also in the train split .*"
        r"test/c1/2.png = train/c3/copy.png",
    ):
        get_benchmark("folder", root=data)


@pytest.mark.parametrize("flags", [[], ["--resume"]])
def test_a_run_of_another_command_in_out_is_named(tmp_path, pretrained, flags):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    error = fails(
        2,
        META + ["--pretrained", pretrained / "best.pt", "--out", out] + flags,
        "holds a run of another command ('pretrain' checkpoints), not a meta-training run",
        "--overwrite",
    )
    assert "pass --resume" not in error


def test_a_finished_pretraining_is_returned_with_a_line_saying_so(tmp_path, capsys):
    # Issue #25: resume=True is the default, so a second script's pretrain(...) on the same folder
    # gets the first run's backbone; it must say so rather than return it silently.
    bench = get_benchmark("kanji", progress=False, **TINY_KANJI)
    config = PretrainConfig(
        backbone="conv4", epochs=1, batch_size=16, steps_per_epoch=2, val_tasks=2, val_ways=3, val_queries=2
    )
    first = pretrain(bench, config, tmp_path / "pre", progress=False)
    capsys.readouterr()
    again = pretrain(bench, config, tmp_path / "pre", progress=True)
    said = capsys.readouterr()
    assert "holds a finished run (epoch 1 of 1" in said.out + said.err and "overwrite" in said.out + said.err
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_the_quick_pretraining_is_the_benchs():
    from mtl_plugin.bench.runner import BenchConfig, pretrain_config_for

    assert pretrain_config_for(BenchConfig.quick(seed=3)) == PretrainConfig.quick(seed=3)
    assert PretrainConfig.quick().steps_per_epoch * PretrainConfig.quick().epochs == 4000


@pytest.mark.parametrize("inside", ["train/c0", "train/run1", "val"])
def test_an_out_inside_the_data_is_refused_before_anything_is_made(tmp_path, inside):
    data = _image_folder(tmp_path / "data")
    before = sorted(data.rglob("*"))
    fails(2, PRETRAIN + FOLDER + ["--root", data, "--out", data / inside], "--out", "inside the input --root")
    bench = ["bench", "--profile", "quick", *FOLDER, "--root", data, "--out", data / inside]
    fails(2, bench, "inside the input --root")
    assert sorted(data.rglob("*")) == before


def test_an_out_inside_the_data_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "cache"))
    fails(2, PRETRAIN + ["--out", tmp_path / "cache" / "kanji" / "run"], "is inside the input --root")


def _edited_copy(source, target, edit):
    """``source`` (a checkpoint) saved to ``target`` after ``edit(state)``."""
    state = torch.load(source, weights_only=True)
    edit(state)
    torch.save(state, target)
    return target


@pytest.mark.parametrize(
    "edit",
    [
        lambda state: state["model"].update(backbone="resnet12-half"),
        lambda state: state["backbone"].update({"layers.0.weight": torch.zeros(3, 3, 3, 3)}),
    ],
    ids=["another-backbone-record", "a-tensor-of-another-shape"],
)
def test_a_checkpoint_whose_weights_do_not_fit_its_record_is_one_error_line(tmp_path, pretrained, edit):
    damaged = _edited_copy(pretrained / "best.pt", tmp_path / "damaged.pt", edit)
    fails(1, EVALUATE + ["--checkpoint", damaged], str(damaged), "do not fit", "pretrain again")
    fails(1, META + ["--pretrained", damaged, "--out", tmp_path / "meta"], str(damaged), "do not fit")


def test_a_checkpoint_of_a_newer_version_is_one_error_line(tmp_path, pretrained):
    out = tmp_path / "pre"
    succeeds(PRETRAIN + ["--out", out])
    _edited_copy(out / "last.pt", out / "last.pt", lambda state: state["config"].update(future_setting=1))
    fails(1, PRETRAIN + ["--resume", "--epochs", "2", "--out", out], "future_setting", "newer version", "upgrade")
    meta = tmp_path / "meta"
    succeeds(META + ["--pretrained", pretrained / "best.pt", "--out", meta])
    for name in ("last.pt", "best.pt"):
        _edited_copy(meta / name, meta / name, lambda state: state["config"].update(future_setting=1))
    fails(1, META + ["--resume", "--iterations", "4", "--out", meta], "future_setting", "newer version")
    fails(1, EVALUATE + ["--checkpoint", meta / "best.pt"], "future_setting", "newer version")


def _bomb_png(path, side=20000):
    """A few hundred bytes of PNG whose header claims ``side`` x ``side`` pixels."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    # IHDR follows the 8-byte signature and its 8-byte length + type: width, height, then its CRC.
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_and_an_unreadable_folder_are_one_error_line(tmp_path, monkeypatch):
    data = _image_folder(tmp_path / "data")
    _bomb_png(data / "train" / "c0" / "0.png")
    fails(1, PRETRAIN + FOLDER + ["--root", data, "--out", tmp_path / "run"], "0.png", "replace")
    data = _image_folder(tmp_path / "other")
    real = Path.iterdir

    def iterdir(self):
        if self == data / "val" / "c1":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    fails(1, PRETRAIN + FOLDER + ["--root", data, "--out", tmp_path / "run2"], "unreadable folder", "c1", "permissions")


def test_mtl_data_naming_a_file_is_one_error_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "file"))
    monkeypatch.setattr(pipeline_cli, "_benchmark", lambda data, root, size, seed: get_benchmark(data, root=root))
    fails(1, PRETRAIN + ["--out", tmp_path / "run"], "MTL_DATA", "is a file", "folder")


def test_one_way_tasks_are_refused_by_the_library_too():
    from mtl_plugin.meta_config import MetaTrainConfig

    with pytest.raises(UsageError, match="at least 2 classes"):
        MetaTrainConfig(ways=1)


@pytest.mark.parametrize("labels", ["learnable", "random"])
def test_a_pretraining_that_does_not_learn_is_warned_about_once(tmp_path, labels):
    import learn2learn as l2l
    from tiny_data import PatternImages, TinyBenchmark, pattern_split

    train = pattern_split(12, 30, 16, seed=0, noise=0.8)
    if labels == "random":
        images = torch.stack([train[i][0] for i in range(len(train))])
        shuffled = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        train = l2l.data.MetaDataset(PatternImages(images, [train[int(i)][1] for i in shuffled]))
    held_out = pattern_split(6, 8, 16, seed=1, noise=0.8)
    bench = TinyBenchmark(train=train, val=held_out, test=held_out, train_augmented=train)
    config = PretrainConfig(
        backbone="conv4", epochs=6, batch_size=32, steps_per_epoch=8, val_tasks=2, val_ways=3, val_queries=2
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(bench, config, tmp_path / "run", progress=False)
    messages = [str(w.message) for w in caught if "not learning" in str(w.message)]
    assert len(messages) == (1 if labels == "random" else 0), messages
    if messages:
        assert "chance level (ln 12 classes" in messages[0] and "lower lr" in messages[0]


def test_a_root_or_preview_through_a_file_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("")
    fails(1, PRETRAIN + ["--root", tmp_path / "file", "--out", tmp_path / "run"], "is a file, not a folder")
    fails(2, ["data", "kanji", "--num-classes", "30", "--preview", tmp_path / "file" / "x.png"], "--preview")
