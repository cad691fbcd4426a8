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
        _assert_adam_state_close(mine, theirs)


def _assert_adam_state_close(state: dict, reference: dict) -> None:
    """One parameter's Adam state: the same step count; moments to 1e-3, and 1e-4 of the reference's largest."""
    assert torch.equal(state["step"], reference["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        scale = float(reference[key].abs().max())
        torch.testing.assert_close(state[key], reference[key], rtol=1e-3, atol=1e-4 * scale)


def _optimised_names(learner: MetaTransferLearner) -> dict[str, int]:
    """The learner's state names of its meta-parameters, to their index in its optimiser's state."""
    index = {id(p): i for i, p in enumerate(p for group in learner.parameter_groups() for p in group["params"])}
    return {name: index[id(p)] for name, p in learner.named_parameters() if id(p) in index}


@pytest.mark.parametrize("hard_tasks", [False, True])
def test_a_checkpoint_written_before_the_thin_learner_resumes_as_the_uninterrupted_run(tmp_path, hard_tasks):
    # last.pt of a run killed during iteration 6 (iteration 4 saved), written by the code in which
    # the learner owned its Adam and schedule (tests/data, commit 10e8a7b, on an AMD EPYC).
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
    # What does not depend on float rounding is the same to the bit: counts, schedule, the tasks drawn.
    assert old["iteration"] == new["iteration"] == config.iterations
    assert old["scheduler"] == new["scheduler"]
    assert old["optimizer"]["param_groups"] == new["optimizer"]["param_groups"]
    torch.testing.assert_close(old["stream"]["rng"], new["stream"]["rng"], rtol=0, atol=0)
    # The hard-task tracker's margins are logits (of order 1): they agree to rounding.
    torch.testing.assert_close(old["stream"], new["stream"], rtol=1e-4, atol=1e-4)
    old_metrics, new_metrics = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("old", "full"))
    exact = ["iteration", "accuracy", "normal_accuracy", "hard_accuracy", "encoder_lr"]
    pd.testing.assert_frame_equal(old_metrics[exact], new_metrics[exact], check_exact=True)
    # The fixture's first four iterations ran on the CPU that wrote it; here they are recomputed,
    # so floats agree to their rounding (bit for bit on that CPU).
    pd.testing.assert_frame_equal(old_metrics, new_metrics, rtol=1e-4)
    for index, state in new["optimizer"]["state"].items():
        _assert_adam_state_close(state, old["optimizer"]["state"][index])
    # Adam moves every coordinate by about lr a step whatever its gradient's size, so a coordinate
    # whose gradient is rounding noise (the last shift: an offset of every feature alike, which the
    # prototype head's distances cancel) steps with that noise's sign, which another CPU may flip:
    # it is bounded by the steps taken. A coordinate with a gradient of its own agrees to rounding.
    optimised = _optimised_names(full)
    lr_sum = float(new_metrics["encoder_lr"].iloc[1:].sum())
    for name, tensor in new["learner"].items():
        reference = old["learner"][name]
        if name not in optimised:
            assert torch.equal(tensor, reference), name
            continue
        gradient_rms = new["optimizer"]["state"][optimised[name]]["exp_avg_sq"].sqrt()
        noise = gradient_rms < 1e-3 * gradient_rms.max()
        assert bool(((tensor - reference)[noise].abs() <= 2 * lr_sum).all()), name
        torch.testing.assert_close(tensor[~noise], reference[~noise], rtol=1e-4, atol=1e-3 * lr_sum, msg=name)
