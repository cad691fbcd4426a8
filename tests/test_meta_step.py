"""The learner driven by a user's own loop and optimiser, and the package's MetaTrainer beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_pipeline import fixed_tasks, tiny_backbone, tiny_benchmark, tiny_config

from mtl_plugin.meta_transfer import MetaTransferLearner
from mtl_plugin.ss import SSAdapter
from mtl_plugin.training.meta_training import meta_train

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
STEPS = 3


@pytest.mark.parametrize("head_init", ["prototype", "kaiming"])
def test_a_user_loop_with_adam_reproduces_meta_train_step(head_init):
    config = tiny_config(head_init=head_init)
    tasks = fixed_tasks(tiny_benchmark().train, config, count=2 * STEPS)
    stepped = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    own = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    optimizer = torch.optim.Adam(own.parameter_groups())
    for step in range(STEPS):
        batch = tasks[2 * step : 2 * step + 2]
        result = stepped.meta_train_step(batch)
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
    for mine, theirs in zip(optimizer.state_dict()["state"].values(), stepped.optimizer.state_dict()["state"].values()):
        assert torch.equal(mine["step"], theirs["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-3, atol=1e-4 * float(theirs[key].abs().max()))


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_a_checkpoint_written_before_the_thin_learner_resumes_bit_for_bit(tmp_path, hard_tasks):
    # last.pt of a run killed during iteration 6 (iteration 4 saved), written by the code in which
    # the learner owned its Adam and schedule (tests/data, commit 10e8a7b).
    suffix = "-hard" if hard_tasks else ""
    config = tiny_config(hard_tasks=hard_tasks)
    (tmp_path / "old").mkdir()
    shutil.copy(DATA / f"meta-last-before-thin-learner{suffix}.pt", tmp_path / "old" / "last.pt")
    resumed = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    meta_train(resumed, tiny_benchmark(), tmp_path / "old", resume=True, progress=False)
    full = MetaTransferLearner(SSAdapter(tiny_backbone()), ways=3, config=config)
    meta_train(full, tiny_benchmark(), tmp_path / "full", progress=False)

    old = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    new = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert old["iteration"] == new["iteration"] == config.iterations
    for name, tensor in new["learner"].items():
        assert torch.equal(tensor, old["learner"][name]), name
    assert old["scheduler"] == new["scheduler"]
    assert old["optimizer"]["param_groups"] == new["optimizer"]["param_groups"]
    for index, state in new["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, old["optimizer"]["state"][index][key]), (index, key)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "old" / "metrics.csv"), pd.read_csv(tmp_path / "full" / "metrics.csv")
    )
