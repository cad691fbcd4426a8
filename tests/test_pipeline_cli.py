"""``mtl pretrain`` -> ``mtl meta-train`` -> ``mtl evaluate`` end to end on tiny data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from test_pipeline import SIDE, tiny_benchmark  # noqa: F401 (fixture)

from mtl_plugin.cli import pipeline as pipeline_cli
from mtl_plugin.speedups import Speedups
from mtl_plugin.training.pretrain import PretrainConfig, pretrain
from mtl_plugin.training.pretrain_checkpoint import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_data(monkeypatch):
    monkeypatch.setattr(pipeline_cli, "_benchmark", lambda *args: tiny_benchmark())


def invoke(command, args):
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def pretrained_and_meta_trained(tmp_path, *flags: str) -> dict:
    """The ``best.pt`` of one meta-training iteration (with ``flags``) on a one-epoch pretraining, in ``tmp_path``."""
    pretrain(
        tiny_benchmark(),
        PretrainConfig(backbone="conv4", epochs=1, batch_size=16, val_tasks=2, val_ways=3, val_queries=3),
        tmp_path / "pre",
        progress=False,
    )
    invoke(
        pipeline_cli.meta_train_command,
        [
            "--pretrained",
            str(tmp_path / "pre" / "best.pt"),
            "--ways",
            "3",
            "--queries",
            "3",
            "--iterations",
            "1",
            "--inner-steps",
            "1",
            "--val-every",
            "1",
            "--val-tasks",
            "2",
            *flags,
            "--out",
            str(tmp_path / "meta"),
            "--quiet",
        ],
    )
    return torch.load(tmp_path / "meta" / "best.pt", weights_only=True)


def test_pretrain_meta_train_evaluate(tmp_path, tiny_data):
    invoke(
        pipeline_cli.pretrain_command,
        [
            "--backbone",
            "conv4",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "--val-tasks",
            "3",
            "--val-ways",
            "3",
            "--val-queries",
            "3",
            "--out",
            str(tmp_path / "pre"),
            "--quiet",
        ],
    )
    backbone = load_pretrained(tmp_path / "pre" / "best.pt")
    assert backbone(torch.zeros(2, 1, SIDE, SIDE)).shape == (2, backbone.feature_dim)
    invoke(
        pipeline_cli.meta_train_command,
        [
            "--pretrained",
            str(tmp_path / "pre" / "best.pt"),
            "--ways",
            "3",
            "--shots",
            "1",
            "--queries",
            "3",
            "--iterations",
            "2",
            "--inner-steps",
            "2",
            "--val-every",
            "2",
            "--val-tasks",
            "3",
            "--hard-tasks",
            "--granularity",
            "channel",
            "--output-scaling",
            "--out",
            str(tmp_path / "meta"),
            "--quiet",
        ],
    )
    results = []
    for name in ("a.json", "b.json"):
        invoke(
            pipeline_cli.evaluate_command,
            [
                "--checkpoint",
                str(tmp_path / "meta" / "best.pt"),
                "--ways",
                "3",
                "--shots",
                "1",
                "--queries",
                "3",
                "--tasks",
                "5",
                "--inner-steps",
                "3",
                "--out",
                str(tmp_path / name),
                "--quiet",
            ],
        )
        results.append(json.loads((tmp_path / name).read_text()))
    assert results[0] == results[1] and results[0]["tasks"] == 5
    output = invoke(
        pipeline_cli.evaluate_command,
        ["--checkpoint", str(tmp_path / "pre" / "best.pt"), "--ways", "3", "--queries", "3", "--tasks", "3", "--quiet"],
    )
    assert "3-way 1-shot" in output


def test_kaiming_head_and_checkpoints_from_before_head_init(tmp_path, tiny_data):
    state = pretrained_and_meta_trained(tmp_path, "--head-init", "kaiming")
    assert state["config"]["head_init"] == "kaiming" and "head_weight" in state["learner"]
    # A checkpoint written before the option existed holds a Kaiming head and no head_init.
    del state["config"]["head_init"]
    torch.save(state, tmp_path / "old.pt")
    evaluate = ["--ways", "3", "--queries", "3", "--tasks", "2", "--inner-steps", "1", "--quiet"]
    assert "3-way 1-shot" in invoke(
        pipeline_cli.evaluate_command, ["--checkpoint", str(tmp_path / "old.pt"), *evaluate]
    )
    result = CliRunner().invoke(
        pipeline_cli.evaluate_command,
        ["--checkpoint", str(tmp_path / "old.pt"), "--ways", "4", "--queries", "3", "--quiet"],
    )
    assert result.exit_code != 0 and "--ways 3" in result.output


def test_speedup_flags_reach_the_learner(tmp_path, tiny_data, monkeypatch):
    seen = []

    def meta_train(learner, *args, **kwargs):
        seen.append(learner.speedups)
        return SimpleNamespace(best_accuracy=0.0, best_iteration=0, best_checkpoint=tmp_path / "best.pt")

    monkeypatch.setattr(pipeline_cli, "meta_train", meta_train)
    base = ["--backbone", "conv4", "--ways", "3", "--queries", "3", "--quiet"]
    invoke(pipeline_cli.meta_train_command, [*base, "--out", str(tmp_path / "a")])
    invoke(
        pipeline_cli.meta_train_command,
        [
            *base,
            "--no-channels-last",
            "--images-per-pass",
            "8",
            "--batch-tasks",
            "--compile",
            "--autocast",
            "bf16",
            "--no-support-without-graph",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert seen == [
        Speedups(),
        Speedups(
            support_without_graph=False,
            batch_tasks=True,
            images_per_pass=8,
            channels_last=False,
            compile=True,
            autocast="bf16",
        ),
    ]
    refused = CliRunner().invoke(
        pipeline_cli.meta_train_command, [*base, "--output-scaling", "--out", str(tmp_path / "c")]
    )
    assert refused.exit_code == 2 and "--output-scaling needs --granularity channel" in refused.output


def test_bad_input_gives_clear_errors(tmp_path, tiny_data):
    runner = CliRunner()
    result = runner.invoke(
        pipeline_cli.meta_train_command,
        ["--backbone", "conv4", "--ways", "30", "--out", str(tmp_path / "m"), "--quiet"],
    )
    assert result.exit_code != 0 and "ways=30" in result.output
    result = runner.invoke(pipeline_cli.evaluate_command, ["--checkpoint", str(tmp_path / "none.pt")])
    assert result.exit_code != 0 and "no checkpoint" in result.output


def test_pretrain_resume_matches_an_uninterrupted_run(tmp_path):
    config = PretrainConfig(backbone="conv4", epochs=2, batch_size=16, lr=0.05, val_tasks=3, val_ways=3, val_queries=3)
    full = pretrain(tiny_benchmark(), config, tmp_path / "full", progress=False)
    pretrain(tiny_benchmark(), PretrainConfig(**{**config.__dict__, "epochs": 1}), tmp_path / "cut", progress=False)
    resumed = pretrain(tiny_benchmark(), config, tmp_path / "cut", progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_meta_train_records_its_ss_config_as_checkpoints_always_did(tmp_path, tiny_data):
    state = pretrained_and_meta_trained(tmp_path)
    # The keys of checkpoints written before SSConfig, so that their runs resume as the same model.
    assert set(state["model"]) == {"backbone", "in_channels", "image_size", "data", "encoder", "granularity", "bn"}
    model = state["model"]
    assert (model["encoder"], model["granularity"], model["bn"]) == ("ss", "kernel", "frozen")
    del state["model"]["backbone"]
    torch.save(state, tmp_path / "unrecorded.pt")
    result = CliRunner().invoke(
        pipeline_cli.evaluate_command, ["--checkpoint", str(tmp_path / "unrecorded.pt"), "--ways", "3", "--quiet"]
    )
    assert result.exit_code == 1 and "does not record its model" in result.output
    assert "in Python" not in result.output and "load_learner" in result.output
