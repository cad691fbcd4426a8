"""The learner driven by a user's own loop and optimiser, and the package's MetaTrainer beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_pipeline import fixed_tasks, tiny_backbone, tiny_benchmark, tiny_config
from tiny_data import raising_at_call

from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.ss import SSAdapter
from mtl_plugin.training.meta_step import MetaTrainer
from mtl_plugin.training.meta_training import meta_train

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
STEPS = 3


@pytest.mark.parametrize("head_init", ["prototype", "kaiming"])
def test_a_user_loop_with_adam_reproduces_the_trainers_step(head_init):
    config = tiny_config(head_init=head_init)
    tasks = fixed_tasks(tiny_benchmark().train, config, count=2 * STEPS)
    stepped = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    own = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    trainer = MetaTrainer(stepped)
    optimizer = torch.optim.Adam(own.parameter_groups())
    for step in range(STEPS):
        batch = tasks[2 * step : 2 * step + 2]
        result = trainer.step(batch)
        optimizer.zero_grad()
        losses = [own.task_loss(*task)[0] for task in batch]
        (sum(losses) / len(losses)).backward()
        optimizer.step()
        # The two losses differ only by the float rounding of the previous steps' updates.
        assert result.loss == pytest.approx(sum(loss.item() for loss in losses) / len(losses), rel=1e-4)
    # Adam moves each weight by about lr per step; the two differ in the rounding of the mean gradient
    # (summed then divided, or divided per task), a small fraction of one step.
    for mine, theirs in zip(own.parameter_groups(), stepped.parameter_groups()):
        for parameter, reference in zip(mine["params"], theirs["params"]):
            torch.testing.assert_close(parameter, reference, rtol=1e-5, atol=1e-3 * mine["lr"] * STEPS)
    # Adam's moments agree as well, to the gradients' own scale: the user's optimiser is the trainer's.
    for mine, theirs in zip(optimizer.state_dict()["state"].values(), trainer.optimizer.state_dict()["state"].values()):
        _assert_adam_state_close(mine, theirs)


def _assert_adam_state_close(state: dict, reference: dict) -> None:
    """One parameter's Adam state: the same step count; moments to 1e-3, and 1e-4 of the reference's largest."""
    assert torch.equal(state["step"], reference["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        scale = float(reference[key].abs().max())
        torch.testing.assert_close(state[key], reference[key], rtol=1e-3, atol=1e-4 * scale)


def _layout(value, path: str = "") -> dict[str, object]:
    """Every leaf of a checkpoint by its path: a tensor by its dtype and shape, anything else by its type."""
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items() for key, leaf in _layout(item, f"{path}/{name}").items()}
    if isinstance(value, (list, tuple)):
        return {key: leaf for i, item in enumerate(value) for key, leaf in _layout(item, f"{path}[{i}]").items()}
    if isinstance(value, torch.Tensor):
        return {path: (value.dtype, tuple(value.shape))}
    return {path: type(value).__name__}


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_a_checkpoint_written_before_the_thin_learner_resumes_as_the_uninterrupted_run(
    tmp_path, hard_tasks, monkeypatch
):
    # last.pt of a run killed during iteration 6 (iteration 4 saved), written by the code in which
    # the learner owned its Adam and schedule (tests/data, commit 10e8a7b, on an AMD EPYC). Its floats
    # carry that CPU's rounding through four meta-updates, which Adam can amplify past any bound that
    # rounding alone sets, so nothing below compares them with floats computed here: the file is
    # checked for what a CPU cannot change (its layout, counts, schedule and tasks), and resuming it
    # must end where this machine's own uninterrupted run ends in all of those. That a resumed run's
    # floats are the uninterrupted run's, bit for bit, is checked on the machine that computes both
    # (test_pipeline.py::test_resumed_run_ends_in_the_uninterrupted_state).
    suffix = "-hard" if hard_tasks else ""
    config = tiny_config(hard_tasks=hard_tasks)
    (tmp_path / "old").mkdir()
    shutil.copy(DATA / f"meta-last-before-thin-learner{suffix}.pt", tmp_path / "old" / "last.pt")
    killed = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    with monkeypatch.context() as patch:
        patch.setattr(MetaTrainer, "step", raising_at_call(MetaTrainer.step, 6))
        with pytest.raises(KeyboardInterrupt):
            meta_train(killed, tiny_benchmark(), tmp_path / "killed", progress=False)
    fixture = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    here = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    # The old file has the layout this code writes: every key, tensor shape and dtype, and the
    # optimiser's state in the same order of parameters; only the record of the training classes is new.
    assert _layout(fixture) == {path: leaf for path, leaf in _layout(here).items() if not path.startswith("/classes")}
    for key in ("iteration", "scheduler", "config", "model", "data", "world_size"):
        assert fixture[key] == here[key], key
    assert fixture["optimizer"]["param_groups"] == here["optimizer"]["param_groups"]
    torch.testing.assert_close(fixture["stream"]["rng"], here["stream"]["rng"], rtol=0, atol=0)

    resumed = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    meta_train(resumed, tiny_benchmark(), tmp_path / "old", resume=True, progress=False)
    full = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    meta_train(full, tiny_benchmark(), tmp_path / "full", progress=False)
    old = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    new = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert _layout(old) == _layout(new)  # the resumed run records its classes too
    assert old["iteration"] == new["iteration"] == config.iterations
    assert old["scheduler"] == new["scheduler"]
    assert old["optimizer"]["param_groups"] == new["optimizer"]["param_groups"]
    torch.testing.assert_close(old["stream"]["rng"], new["stream"]["rng"], rtol=0, atol=0)
    assert all(bool(torch.isfinite(tensor).all()) for tensor in old["learner"].values() if tensor.is_floating_point())
    old_metrics, new_metrics = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("old", "full"))
    assert list(old_metrics.columns) == list(new_metrics.columns)
    pd.testing.assert_frame_equal(old_metrics[["iteration", "encoder_lr"]], new_metrics[["iteration", "encoder_lr"]])
