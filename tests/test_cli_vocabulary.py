"""One vocabulary across the `mtl` commands, help on every option, defaults from the configs,
and a `mtl --help` that answers without loading torch."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mtl_plugin.cli import COMMANDS, main
from mtl_plugin.meta_config import MetaTrainConfig
from mtl_plugin.training.pretrain import PretrainConfig


def _command(name):
    return main.get_command(click.Context(main), name)


def _commands():
    for name in COMMANDS:
        command = _command(name)
        if isinstance(command, click.Group):
            for sub, subcommand in command.commands.items():
                yield f"{name} {sub}", subcommand
        else:
            yield name, command


@pytest.mark.parametrize("name,command", list(_commands()))
def test_every_option_has_help(name, command):
    missing = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not missing, f"mtl {name}: options without help text: {missing}"


def test_the_listed_help_is_each_commands_own():
    for name, (_, _, text) in COMMANDS.items():
        own = _command(name).help.split("\n\n")[0].replace("\n", " ").strip()
        assert own.startswith(text.rstrip(".")), f"mtl {name}: listed as {text!r}, its docstring says {own!r}"


def test_help_defaults_come_from_the_config_dataclasses():
    pretrain, meta = _command("pretrain"), _command("meta-train")
    assert f"[default: {PretrainConfig.epochs}]" in _help(pretrain, "--epochs")
    assert f"[default: {PretrainConfig.lr}]" in _help(pretrain, "--lr")
    assert f"[default: {MetaTrainConfig.encoder_lr}]" in _help(meta, "--encoder-lr")
    assert f"[default: {MetaTrainConfig.iterations}]" in _help(meta, "--iterations")


def test_the_commands_share_one_vocabulary():
    for name, command in _commands():
        options = {opt for p in command.params for opt in p.opts}
        assert "--dataset" not in options and "--progress" not in options, f"mtl {name}"
    for name in ("pretrain", "meta-train", "evaluate", "bench"):
        options = {opt for p in _command(name).params for opt in p.opts}
        assert {"--data", "--root", "--quiet"} <= options, name
    for name in ("pretrain", "meta-train"):
        command = _command(name)
        resume = [p for p in command.params if p.name == "resume"][0]
        assert resume.is_flag and not resume.get_default(click.Context(command))


def test_mtl_help_loads_neither_torch_nor_pandas():
    code = (
        "import sys; from click.testing import CliRunner; from mtl_plugin.cli import main; "
        "result = CliRunner().invoke(main, ['--help']); assert result.exit_code == 0, result.output; "
        "print(sorted(m for m in ('torch', 'pandas', 'learn2learn') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_bench_picks_the_profile_this_machine_can_run_and_says_so(monkeypatch, tmp_path):
    import torch

    from mtl_plugin.cli import bench as bench_cli

    seen = {}

    def fake_run(config, echo):
        seen["config"] = config
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_cli, "run_bench", fake_run)
    result = CliRunner().invoke(main, ["bench", "--data", "kanji", "--out", str(tmp_path / "b"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "--profile quick, chosen for this machine (no GPU)" in result.output
    assert seen["config"].profile == "quick" and seen["config"].image_size == 28
    assert seen["config"].progress is False


def _help(command, option):
    return [p for p in command.params if option in p.opts][0].help
